"""Cloud-init user-data templates and the stdlib-only job agent they install on each VM."""
