"""`python -m dist_nmt.ops build|status`: compile the fused-op library, or report whether it loads."""
from __future__ import annotations

import argparse
import logging
import sys

from dist_nmt import ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["build", "status"])
    parser.add_argument("--force", action="store_true", help="rebuild even when the library is current")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[dist_nmt.ops] %(message)s")
    if args.action == "build":
        try:
            path = ops.build(force=args.force)
        except RuntimeError as err:
            logging.error("%s", err)
            return 1
        logging.info("fused ops library current: %s", path)
        return 0
    return 0 if ops.load() else 1


if __name__ == "__main__":
    sys.exit(main())
