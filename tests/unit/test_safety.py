from __future__ import annotations

import pytest

from predictord.http.safety import ENV_VALUE, OUTSIDE, authorized, redact, redact_status


def test_authorized_compares_the_bearer_token() -> None:
    assert authorized([], None)
    assert authorized([(b"authorization", b"Bearer tok")], b"tok")
    assert authorized([(b"authorization", b"bearer  tok ")], b"tok")
    for value in (b"Bearer tok2", b"Bearer to", b"Basic tok", b"tok", b"Bearer", b""):
        assert not authorized([(b"authorization", value)], b"tok"), value
    assert not authorized([(b"x-token", b"tok")], b"tok")


def test_redact_keeps_the_predictors_directory_and_hides_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SECRET", "hunter2hunter2")
    monkeypatch.setenv("SHORT", "abc")
    text = ("/srv/p/a.py:3: open('/etc/ssl/private/k.pem') failed, token hunter2hunter2, see /srv/p and /srv/pp/x; "
            "abc")
    assert redact(text, "/srv/p") == (f"/srv/p/a.py:3: open('{OUTSIDE}') failed, token {ENV_VALUE}, see /srv/p and "
                                      f"{OUTSIDE}; abc")
    assert redact("a/b c", "/srv/p") == "a/b c", "relative paths are the user's words"


def test_redact_status_copies_only_when_there_is_an_error() -> None:
    ok = {"state": "ready", "error": None}
    assert redact_status(ok, "/p") is ok
    failed = {"state": "failed", "error": {"message": "x /etc/passwd", "file": "/p/a.py", "line": 1}}
    assert redact_status(failed, "/p")["error"] == {"message": f"x {OUTSIDE}", "file": "/p/a.py", "line": 1}
    assert failed["error"]["message"] == "x /etc/passwd"


def test_status_page_writes_text_never_markup() -> None:
    """Every string on the page comes from predictors or their errors: it may only reach the DOM as text (the
    browser test checks a <script> error shows as text; this holds where no browser is installed)."""
    from predictord.http.page import PAGE

    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in PAGE, sink
    assert "textContent" in PAGE


def test_markup_in_a_predictors_own_message_is_not_taken_for_a_path() -> None:
    text = "RuntimeError: <b>bold</b><script>alert(2)</script> in /etc/secret"
    assert redact(text, "/srv/predictors") == ("RuntimeError: <b>bold</b><script>alert(2)</script> in "
                                               "<a path outside the predictors directory>")
