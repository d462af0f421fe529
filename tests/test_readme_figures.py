"""bench/readme_figures.py: the README's quickstart example is rendered from a real output."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from readme_figures import (
    BLOCK,
    README,
    TIMING,
    current_block,
    render_output,
    replace_between,
)

OUTPUT = """run folder: /home/u/x/runs/quickstart
20 devices (pathological split of digits; ...)
model cnn, strategy fedavg, algorithm fedavg, 3 rounds
round   1/3  updates 10/10  loss 1.372  global test  10.0%  worse 0%    31.7s
round   2/3  updates 10/10  loss 0.9  global test  40.0%  worse 0%    35.2s
round   3/3  updates 10/10  loss 0.128  global test  74.2%  worse 5%   40.1s
personalization helped 17 of 20 devices (+20.4 points on average), hurt 1.
done in 45.3s: global test accuracy 0.7417; results in /home/u/x/runs/quickstart
"""


def test_the_block_keeps_first_and_last_round_and_hides_machine_details() -> None:
    got = render_output(OUTPUT).splitlines()
    assert got[0] == "run folder: /…/runs/quickstart"
    assert got[3].startswith("round   1/3") and got[3].endswith("worse 0%    …s")
    assert got[4] == "…" and got[5].startswith("round   3/3") and "74.2%" in got[5]
    assert not any("2/3" in ln for ln in got)
    assert got[-1] == "done in …s: global test accuracy 0.7417; results in /…/runs/quickstart"
    assert "+20.4 points" in got[-2]


def test_an_output_without_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="no round lines"):
        render_output("error: something\n")


def test_the_readme_has_both_markers_and_its_block_is_a_rendered_output() -> None:
    text = README.read_text()
    block = current_block(text, BLOCK)
    assert block.startswith("```\nrun folder: ") and block.endswith("\n```")
    inner = block.removeprefix("```\n").removesuffix("\n```")
    assert render_output(inner) == inner  # rendering is a fixed point: nothing hand-edited
    assert current_block(text, TIMING).startswith("It took ")
    assert replace_between(text, BLOCK, block) == text
