"""Django for a bench script: production settings (with DEBUG on, Django's debug cursor would
time and keep every query), quiet logs, the repository on the path. Imported first, before
anything that reads settings:

    import django_env  # the bench folder is the script's own, so first on sys.path

    django_env.setup(ALLOWED_HOSTS="testserver")
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup(**env: str) -> None:
    sys.path.insert(0, str(ROOT))
    defaults = {
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "LOG_LEVEL": "WARNING",
        "DEBUG": "0",
        "SECRET_KEY": "bench-only-" + "x" * 50,
        **env,
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    # After the environment above: settings are read at setup.
    import django

    django.setup()
