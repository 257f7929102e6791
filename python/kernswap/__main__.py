"""`python -m kernswap`: print diagnostics (`--json` for machine-readable output)."""
import json
import sys

from .diagnostics import format_info, info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--json" in argv:
        print(json.dumps(info(), indent=2, default=str))
    else:
        print(format_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
