"""What the ``revffn`` commands share: click's context settings and the option groups,
as decorators."""

from __future__ import annotations

#: every command: -h as well as --help, help text up to 100 columns
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
