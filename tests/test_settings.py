from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_deploy_check_is_clean_with_production_settings():
    env = dict(
        os.environ,
        DEBUG="0",
        SECRET_KEY="x" * 64 + "-production-secret-Zq9!",
        ALLOWED_HOSTS="cards.example.com",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_without_a_secret_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"} | {"DEBUG": "0"}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def settings_in_a_fresh_process(env: dict[str, str], *names: str) -> dict:
    """Settings are read once at import, so each environment needs its own process."""
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n) for n in {list(names)!r}}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env | {"DJANGO_SETTINGS_MODULE": "project.settings"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_without_allowed_hosts_debug_off_serves_loopback_and_web_host():
    env = {k: v for k, v in os.environ.items() if k != "ALLOWED_HOSTS"}
    found = settings_in_a_fresh_process(
        env | {"DEBUG": "0", "SECRET_KEY": "s" * 60, "WEB_HOST": "10.1.2.3"}, "ALLOWED_HOSTS"
    )
    assert found["ALLOWED_HOSTS"] == ["127.0.0.1", "localhost", "[::1]", "10.1.2.3"]
    found = settings_in_a_fresh_process(env | {"WEB_HOST": "0.0.0.0"}, "ALLOWED_HOSTS")
    assert found["ALLOWED_HOSTS"] == ["127.0.0.1", "localhost", "[::1]"]


def test_default_urls_carry_the_passwords_make_run_generated(tmp_path):
    (tmp_path / "postgres-password.txt").write_text("pg-secret\n")
    (tmp_path / "redis-password.txt").write_text("redis-secret\n")
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    found = settings_in_a_fresh_process(
        env | {"VAR_DIR": str(tmp_path), "EMBEDDED_PG_PORT": "5555", "EMBEDDED_REDIS_PORT": "6666"},
        "DATABASE_URL",
        "REDIS_URL",
    )
    assert found == {
        "DATABASE_URL": "postgres://postgres:pg-secret@127.0.0.1:5555/promptcards",
        "REDIS_URL": "redis://:redis-secret@127.0.0.1:6666/0",
    }


def test_channel_layer_is_pubsub_unless_list_is_asked_for_and_a_typo_refuses():
    def settings_with(value: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "CHANNEL_LAYER"}
        if value is not None:
            env["CHANNEL_LAYER"] = value
        return subprocess.run(
            [sys.executable, "-c", "import project.settings as s; print(s.CHANNEL_LAYERS)"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert "testruns.live.layer.PubSubChannelLayer" in settings_with(None).stdout
    assert "testruns.live.layer.PubSubChannelLayer" in settings_with("pubsub").stdout
    assert "channels_redis.core.RedisChannelLayer" in settings_with("list").stdout
    typo = settings_with("lists")
    assert typo.returncode != 0 and "CHANNEL_LAYER must be one of" in typo.stderr
