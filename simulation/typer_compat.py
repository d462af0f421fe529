"""Keep the help of positional arguments with click >= 8.2 and typer < 0.21.

Why: ``typer.core.TyperArgument.__init__`` stores ``help`` and then calls
``click.Argument.__init__``, which since click 8.2 takes a ``help`` of its own and
overwrites the attribute with ``None``; ``--help`` then shows every positional
argument without its text (``config [CONFIG]``). We set it again after the base
class ran. Nothing happens when the installed pair keeps the help by itself.
"""

from __future__ import annotations

from typing import Any

import typer.core

_original = typer.core.TyperArgument.__init__


def _keeps_help() -> bool:
    arg = typer.core.TyperArgument(param_decls=["probe"], help="probe")
    return arg.help == "probe"


def apply() -> None:
    """Patch ``TyperArgument`` once, only when the installed versions drop the help."""
    if getattr(typer.core.TyperArgument, "_hybridfl_help_fix", False) or _keeps_help():
        return

    def __init__(self: typer.core.TyperArgument, *args: Any, **kwargs: Any) -> None:
        _original(self, *args, **kwargs)
        self.help = kwargs.get("help")

    typer.core.TyperArgument.__init__ = __init__  # type: ignore[method-assign]
    typer.core.TyperArgument._hybridfl_help_fix = True  # type: ignore[attr-defined]


__all__ = ["apply"]
