import sys

if sys.argv[1:] == ["--version"]:  # answered before Lightning and timm are imported
    from importlib.metadata import version

    print(f"dsm-lightning {version('dsm-lightning')}")
    raise SystemExit(0)

from .app.cli import main

main()
