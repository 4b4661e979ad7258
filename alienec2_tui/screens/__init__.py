"""Modal screens of the console: help, dialogs, VM details."""
