"""Framework-free building blocks shared by the client, the server and the CLI."""
