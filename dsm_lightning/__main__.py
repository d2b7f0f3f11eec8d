"""``python -m dsm_lightning`` and the ``dsm-lightning`` command: the application's command line (the ``app`` extra)."""

import sys


def main() -> None:
    """Run the command line; ``--version`` is answered before Lightning and timm are imported, and a missing ``app``
    extra is one line naming the fix."""
    if sys.argv[1:] == ["--version"]:
        from importlib.metadata import version

        print(f"dsm-lightning {version('dsm-lightning')}")
        raise SystemExit(0)
    from .app import missing_requirements

    missing = missing_requirements()
    if missing:
        print(
            f"dsm-lightning: error: the command line needs the app extra ({', '.join(missing)} not installed); "
            "fix: pip install 'dsm-lightning[app]'",
            file=sys.stderr,
        )
        raise SystemExit(1)
    from .app.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
