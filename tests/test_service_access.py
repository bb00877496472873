"""With API keys on, only /health is open; the UI asks for a key; uploads are closed; a server on
a reachable interface needs a key or an explicit --allow-no-auth."""

from __future__ import annotations

import pytest


KEY = "sk-access"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(make_client, wait_ready, tiny_policy):
    pytest.importorskip("gradio")
    with make_client(tiny_policy, api_keys=[KEY], ui=True) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/v1/attributes",
                                  "/anything-else"])
def test_every_route_but_health_needs_the_key(keyed, path):
    r = keyed.get(path)
    assert r.status_code == 401, (path, r.status_code)
    assert r.json()["error"]["type"] == "authentication_error" and r.headers["WWW-Authenticate"] == "Bearer"
    assert keyed.get(path, headers=AUTH).status_code in (200, 404)
    assert keyed.get("/health").status_code == 200


def test_the_ui_asks_for_the_key(keyed):
    # Gradio's own routes refuse a visitor who has not logged in with a key as the password.
    assert keyed.get("/ui/config").status_code == 401
    wrong = keyed.post("/ui/login", data={"username": "me", "password": "sk-wrong"})
    assert wrong.status_code in (400, 401)
    assert keyed.get("/ui/config").status_code == 401
    ok = keyed.post("/ui/login", data={"username": "me", "password": KEY})
    assert ok.status_code == 200, ok.text
    assert keyed.get("/ui/config").status_code == 200


@pytest.mark.parametrize("keys", [[], [KEY]])
def test_uploads_are_closed(make_client, wait_ready, tiny_policy, keys):
    pytest.importorskip("gradio")
    with make_client(tiny_policy, api_keys=keys, ui=True) as c:
        wait_ready(c)
        files = [("files", (f"f{i}.txt", b"x" * 10, "text/plain")) for i in range(50)]
        r = c.post("/ui/gradio_api/upload", files=files, headers=AUTH)
        assert r.status_code == 403 and r.json()["error"]["code"] == "uploads_disabled"
        assert c.post("/ui/gradio_api/upload/", files=files[:1], headers=AUTH).status_code == 403


def test_a_reachable_interface_needs_a_key_or_allow_no_auth(tiny_policy, monkeypatch):
    from steer.service.cli import ServeConfig
    from steer.service.cli import main as serve_main
    from steer.service.settings import SettingsError

    monkeypatch.delenv("STEER_API_KEYS", raising=False)
    monkeypatch.delenv("STEER_ALLOW_NO_AUTH", raising=False)
    with pytest.raises(SettingsError, match="--allow-no-auth") as info:
        serve_main(ServeConfig(policy=str(tiny_policy), host="0.0.0.0"))
    assert info.value.field == "api_keys"
    ServeConfig(policy=str(tiny_policy), host="0.0.0.0", allow_no_auth=True).to_settings().check_exposure()
    ServeConfig(policy=str(tiny_policy), host="0.0.0.0", api_key=["k"]).to_settings().check_exposure()
    ServeConfig(policy=str(tiny_policy), host="127.0.0.1").to_settings().check_exposure()
    monkeypatch.setenv("STEER_ALLOW_NO_AUTH", "1")
    ServeConfig(policy=str(tiny_policy), host="0.0.0.0").to_settings().check_exposure()
