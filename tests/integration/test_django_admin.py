"""The Django admin's celery-unique pages: Django's test client and a real headless
Chromium (Debian's chromium and chromium-driver, driven by Selenium with the
driver's path given: nothing is downloaded), against a real worker and Redis.

Each browser test keeps a screenshot of every page it looked at under its
temporary folder; a failure lists them.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import redis
from celery import Celery
from django.test import override_settings

from celery_unique.browse import value_digest
from celery_unique.conf import get_conf
from celery_unique.locks import new_owner
from tests.integration.conftest import SCREENSHOTS, Events, wait_for
from tests.integration.worker_app import django_recompute, open_gate

APP = "tests.integration.worker_app.app"
UNREACHABLE = "tests.integration.test_django_admin.unreachable_app"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PASSWORD = "not-a-secret-1"


@pytest.fixture(scope="module")
def admin_users(django_databases: list[str]) -> dict[str, Any]:
    """A superuser and a staff user who may only look."""
    from django.contrib.auth.models import Permission, User

    User.objects.filter(username__in=["boss", "viewer"]).delete()
    boss = User.objects.create_superuser("boss", "boss@example.com", PASSWORD)
    viewer = User.objects.create_user("viewer", "viewer@example.com", PASSWORD, is_staff=True)
    viewer.user_permissions.set(
        Permission.objects.filter(content_type__app_label="celery_unique", codename__startswith="view_")
    )
    return {"boss": boss, "viewer": viewer}


@pytest.fixture
def admin_app(celery_app: Any) -> Iterator[Any]:
    """The admin reads the locks of the test worker's app."""
    with override_settings(CELERY_UNIQUE_APP=APP):
        yield celery_app


def client_for(user: Any, **options: Any) -> Any:
    from django.test import Client

    client = Client(**options)
    client.force_login(user)
    return client


# -- the pages through Django's test client ---------------------------------------


def test_the_pages_show_locks_outcomes_and_fan_ins(
    admin_app: Any, admin_users: dict[str, Any], token: str, redis_client: redis.Redis
) -> None:
    from celery_unique.aggregate import aggregator

    queued = django_recompute.apply_async((token,), queue=f"parked-{token}")  # no worker reads it
    agg = aggregator(admin_app)
    agg.create(token, ["a", "b", "c"], callback=django_recompute.s(token), timeout=60)
    agg.report(token, "a", value=1)
    client = client_for(admin_users["viewer"])
    index = client.get("/admin/")
    assert index.status_code == 200
    assert b"celery-unique" in index.content and b"/admin/celery_unique/lock/" in index.content
    page = client.get("/admin/celery_unique/lock/", {"q": queued.id})
    assert page.status_code == 200
    body = page.content.decode()
    assert queued.id in body and "tests.django_recompute" in body and "queued" in body
    assert "Release selected locks" not in body  # the viewer may not
    fan_ins = client.get("/admin/celery_unique/fanin/").content.decode()
    assert token in fan_ins and "1 of 3" in fan_ins
    assert client.get("/admin/celery_unique/outcome/").status_code == 200
    redis_client.delete(f"parked-{token}")


def test_an_action_needs_its_permission_and_a_csrf_token(
    admin_app: Any, admin_users: dict[str, Any], token: str
) -> None:
    held = django_recompute.apply_async((token,), queue=f"parked-{token}")
    key = django_recompute.unique_lock_key((token,))
    choice = f"{key}|{value_digest(get_conf(admin_app).locks.owner(key)[0] or '')}"
    confirmed = {"selected": [choice], "confirmed": "yes"}
    viewer = client_for(admin_users["viewer"])
    assert viewer.post("/admin/celery_unique/lock/act/", confirmed).status_code == 403
    guarded = client_for(admin_users["boss"], enforce_csrf_checks=True)
    assert guarded.post("/admin/celery_unique/lock/act/", confirmed).status_code == 403  # no CSRF token
    assert django_recompute.unique_store().holder(key)[0] == held.id
    # A stale digest (another holder since the page was read) releases nothing.
    boss = client_for(admin_users["boss"])
    stale = {"selected": [f"{key}|{'0' * 16}"], "confirmed": "yes"}
    said = boss.post("/admin/celery_unique/lock/act/", stale, follow=True).content.decode()
    assert "Not released" in said
    assert django_recompute.unique_store().holder(key)[0] == held.id
    # Unconfirmed: a confirmation page, nothing done.
    asked = boss.post("/admin/celery_unique/lock/act/", {"selected": [choice]})
    assert b"are you sure" in asked.content and django_recompute.unique_store().holder(key)[0] == held.id
    boss.post("/admin/celery_unique/lock/act/", confirmed)
    assert django_recompute.unique_store().holder(key)[0] is None
    from django.contrib.admin.models import LogEntry

    entry = LogEntry.objects.filter(object_id=key).latest("action_time")
    assert entry.user.username == "boss" and "Released" in entry.change_message


def test_a_locks_page_shows_the_holders_result_and_releases_from_there(
    admin_app: Any, admin_users: dict[str, Any], token: str, redis_client: redis.Redis
) -> None:
    held = django_recompute.apply_async((token,), queue=f"parked-{token}")
    key = django_recompute.unique_lock_key((token,))
    boss = client_for(admin_users["boss"])
    listing = boss.get("/admin/celery_unique/lock/", {"q": held.id}).content.decode()
    [link] = re.findall(r'<th><a href="([^"]+)">tests.django_recompute</a></th>', listing)
    page = boss.get(link).content.decode()
    assert key in page and held.id in page
    assert "PENDING" in page  # the holder's state in the test app's result backend
    [choice] = re.findall(r'name="selected" value="([^"]+)"', page)
    boss.post("/admin/celery_unique/lock/act/", {"selected": [choice], "confirmed": "yes"})
    assert django_recompute.unique_store().holder(key)[0] is None
    gone = boss.get(link, follow=True)
    assert gone.redirect_chain and b"is gone" in gone.content
    redis_client.delete(f"parked-{token}")


def test_pages_walk_every_lock_once_whatever_the_names(
    admin_app: Any, admin_users: dict[str, Any], redis_client: redis.Redis
) -> None:
    """2,500 locks of a task whose name holds : * [ { are walked page after page by
    the next-page links: none missed, although the rows of the first page are
    released before the second is read (SCAN then collects another batch from the
    same cursor: a page cursor inside a batch missed rows), and pages stay near
    their size."""
    from celery_unique import UniqueTask

    name = f"admin.odd:*[{{{uuid.uuid4().hex[:6]}"

    def odd(n: int) -> int:
        return n

    task = admin_app.task(base=UniqueTask, name=name, shared=False)(odd)
    store = task.unique_store()
    keys = {task.unique_lock_key((n,)) for n in range(2500)}
    owners = {}
    pipe = store.client.pipeline(transaction=False)  # the lock Redis (a cluster's too)
    for n, key in enumerate(sorted(keys)):
        owners[f"owner-{n}"] = key
        pipe.set(key, new_owner(f"owner-{n}"), px=600_000)
    pipe.execute()
    try:
        client = client_for(admin_users["viewer"])
        url, seen, pages = f"/admin/celery_unique/lock/?task={quote_plus(name)}", [], 0
        while url:
            body = client.get(url).content.decode()
            pages += 1
            shown = re.findall(r"<td>(owner-\d+)</td>", body)
            assert len(shown) <= 120
            seen += shown
            if pages == 1:
                store.client.delete(*(owners[owner] for owner in shown))
            found = re.search(r'href="(\?[^"]*)" id="next-page"', body)
            url = "/admin/celery_unique/lock/" + found.group(1).replace("&amp;", "&") if found else ""
        assert set(seen) == set(owners)
        assert len(seen) == len(owners)  # none twice: no rehash happened here
        assert pages >= 21
    finally:
        store.client.delete(*keys)
        admin_app.tasks.pop(name, None)


@pytest.mark.worker
def test_forgetting_a_stored_outcome_lets_the_next_call_run(
    worker: Any, admin_app: Any, admin_users: dict[str, Any], token: str, events: Events
) -> None:
    from tests.integration.worker_app import idempotent

    first = idempotent.delay(token, 7)
    assert first.get(timeout=30) == {"token": token, "charged": 7}
    assert idempotent.delay(token, 7).replayed  # stored: not run again
    boss = client_for(admin_users["boss"])
    body = boss.get("/admin/celery_unique/outcome/", {"task": "tests.idempotent"}).content.decode()
    [row] = [row for row in body.split('<tr class="celery-unique-row">')[1:] if first.id in row]
    [choice] = re.findall(r'name="selected" value="([^"]+)"', row)
    assert "success" in row
    said = boss.post(
        "/admin/celery_unique/outcome/act/", {"selected": [choice], "confirmed": "yes"}, follow=True
    )
    assert "the next call of its key runs" in said.content.decode()
    again = idempotent.delay(token, 7)
    assert not again.duplicate and again.get(timeout=30) == {"token": token, "charged": 7}
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id, again.id]
    idempotent.unique_store().client.delete(idempotent.unique_lock_key((token,)).replace(":lock", ":result"))


def test_a_cursor_or_state_typed_by_hand_is_refused_with_a_message(
    admin_app: Any, admin_users: dict[str, Any]
) -> None:
    viewer = client_for(admin_users["viewer"])
    for query in ({"cursor": "nonsense"}, {"cursor": "0-0--5"}, {"state": "sleeping"}):
        answer = viewer.get("/admin/celery_unique/lock/", query, follow=True)
        assert answer.redirect_chain and answer.status_code == 200
        said = answer.content.decode().lower()  # the admin capitalizes a message
        assert "not a page cursor" in said or "state must be one of" in said


def test_an_app_without_a_lock_redis_is_one_error_page_not_a_redirect_loop(
    admin_users: dict[str, Any],
) -> None:
    with override_settings(CELERY_UNIQUE_APP="tests.integration.test_django_admin.amqp_app"):
        answer = client_for(admin_users["boss"]).get("/admin/celery_unique/lock/")
    assert answer.status_code == 503
    assert b"celery-unique is not configured for this app" in answer.content


def test_a_misspelt_celery_unique_app_is_a_system_check_error(django_databases: list[str]) -> None:
    from django.core import checks

    with override_settings(CELERY_UNIQUE_APP="tests.no_such_module.app"):
        found = {m.id: m.msg for m in checks.run_checks(tags=["celery_unique"])}
    assert "CELERY_UNIQUE_APP" in found["celery_unique.E004"]


def test_redis_unreachable_is_one_clear_error(admin_users: dict[str, Any]) -> None:
    with override_settings(CELERY_UNIQUE_APP=UNREACHABLE):
        client = client_for(admin_users["boss"])
        for page in ("lock", "outcome", "fanin"):
            answer = client.get(f"/admin/celery_unique/{page}/")
            assert answer.status_code == 503
            assert b"The lock Redis cannot be reached" in answer.content
            assert b"Traceback" not in answer.content


# -- the browser ----------------------------------------------------------------


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra has it)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests need a browser in CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def live_server(django_databases: list[str]) -> Iterator[str]:
    """Django's live server in a thread of this process (so override_settings reaches it)."""
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.test.testcases import LiveServerThread

    server = LiveServerThread("127.0.0.1", StaticFilesHandler, port=0)
    server.daemon = True
    server.start()
    server.is_ready.wait()
    if server.error:
        raise server.error
    yield f"http://127.0.0.1:{server.port}"
    server.terminate()


@pytest.fixture
def look(
    browser: Any, live_server: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """``look(path, name)``: open a page, keep its screenshot, return its text."""
    shots: list[str] = []
    request.node.stash[SCREENSHOTS] = shots  # listed in the report of a failure (conftest)

    def shot(name: str) -> None:
        target = tmp_path / f"{len(shots):02d}-{name}.png"
        browser.save_screenshot(str(target))
        shots.append(str(target))

    def open_page(path: str, name: str) -> str:
        browser.get(live_server + path)
        shot(name)
        return str(browser.find_element("tag name", "body").text)

    open_page.shot = shot  # type: ignore[attr-defined]
    yield open_page
    browser.delete_all_cookies()


def submit(browser: Any, button: str, then: str) -> Any:
    """Click a form's button and wait for the page it leads to, found by an element of
    its own (``then``, a CSS selector): a click may return before the next page loaded
    (CI's py312 env looked for the confirmation's button on the list page)."""
    browser.find_element("id", button).click()
    return wait_for(lambda: browser.find_elements("css selector", then))[0]


def log_in(browser: Any, look: Any, username: str) -> None:
    look("/admin/login/?next=/admin/", "login")
    browser.find_element("name", "username").send_keys(username)
    browser.find_element("name", "password").send_keys(PASSWORD)
    browser.find_element("css selector", "input[type=submit]").click()
    wait_for(lambda: "Site administration" in browser.page_source)


@pytest.mark.worker
def test_a_person_releases_the_lock_of_a_running_task_and_the_next_delay_publishes(
    worker: Any,
    admin_app: Any,
    admin_users: dict[str, Any],
    browser: Any,
    look: Any,
    token: str,
    events: Events,
    redis_client: redis.Redis,
) -> None:
    from django.contrib.admin.models import LogEntry

    running = django_recompute.delay(token, gated=True)
    wait_for(lambda: events(), worker=worker)  # it runs, waiting at its gate
    log_in(browser, look, "boss")
    index = look("/admin/", "index")
    assert "Locks" in index and "Stored outcomes" in index and "Open fan-ins" in index

    def filtered() -> bool:
        """Filter as a person does: the task and the state chosen, the task id typed."""
        from selenium.webdriver.support.select import Select

        look("/admin/celery_unique/lock/", "locks")
        Select(browser.find_element("id", "filter-task")).select_by_value("tests.django_recompute")
        Select(browser.find_element("id", "filter-state")).select_by_value("running")
        browser.find_element("id", "search-holder").send_keys(running.id)
        browser.find_element("id", "filter-submit").click()
        wait_for(lambda: "state=running" in browser.current_url)  # the filtered page, not the last one
        look.shot("locks-filtered")
        return running.id in browser.find_element("id", "result_list").text

    # The worker's beat says it runs (every few seconds): filter again until it shows.
    wait_for(filtered, timeout=20, worker=worker)
    assert "state=running" in browser.current_url
    assert "running" in browser.find_element("id", "result_list").text
    browser.find_element("css selector", "input.row-select").click()
    submit(browser, "act", then="#confirm")
    look.shot("confirm")
    assert "are you sure" in browser.page_source
    messages = submit(browser, "confirm", then="ul.messagelist")
    look.shot("released")
    assert "Released" in messages.text
    assert django_recompute.unique_store().holder(django_recompute.unique_lock_key((token,)))[0] is None
    again = django_recompute.delay(token, gated=True)
    assert not again.duplicate and again.id != running.id
    entry = LogEntry.objects.filter(user__username="boss").latest("action_time")
    assert entry.object_id == django_recompute.unique_lock_key((token,)) and entry.is_deletion()
    open_gate(redis_client, token)
    wait_for(lambda: sum(e["event"] == "end" for e in events()) == 2, timeout=30, worker=worker)


def test_a_person_without_the_permission_sees_no_action_and_is_refused(
    admin_app: Any,
    admin_users: dict[str, Any],
    browser: Any,
    look: Any,
    token: str,
    redis_client: redis.Redis,
) -> None:
    held = django_recompute.apply_async((token,), queue=f"parked-{token}")
    log_in(browser, look, "viewer")
    text = look(f"/admin/celery_unique/lock/?q={held.id}", "viewer-locks")
    assert held.id in text and "queued" in text
    assert not browser.find_elements("id", "act")
    assert (
        "403" in look("/admin/celery_unique/lock/act/", "viewer-refused")
        or "Forbidden" in browser.page_source
    )
    assert django_recompute.unique_store().holder(django_recompute.unique_lock_key((token,)))[0] == held.id
    redis_client.delete(f"parked-{token}")


@pytest.mark.worker
def test_a_person_expires_a_fan_in_and_its_errback_fires(
    worker: Any,
    admin_app: Any,
    admin_users: dict[str, Any],
    browser: Any,
    look: Any,
    token: str,
    events: Events,
) -> None:
    from celery_unique.aggregate import aggregator
    from tests.integration.worker_app import fan_collect, fan_errback

    aggregator(admin_app).create(
        token,
        ["a", "b"],
        callback=fan_collect.s(token=token),
        errback=fan_errback.s(token=token),
        timeout=600,
    )
    log_in(browser, look, "boss")
    text = look("/admin/celery_unique/fanin/", "fan-ins")
    assert token in text and "0 of 2" in text
    row = browser.find_element("xpath", f"//tr[td[contains(., '{token}')] or th[contains(., '{token}')]]")
    row.find_element("css selector", "input.row-select").click()
    submit(browser, "act", then="#confirm")
    messages = submit(browser, "confirm", then="ul.messagelist")
    look.shot("fan-in-expired")
    assert "Expired fan-in" in messages.text
    [errback] = wait_for(lambda: [e for e in events() if e["event"] == "errback"], worker=worker)
    assert sorted(errback["info"]["missing"]) == ["a", "b"]


def test_the_browser_sees_one_error_when_redis_is_down(
    admin_users: dict[str, Any], browser: Any, look: Any
) -> None:
    log_in(browser, look, "boss")
    with override_settings(CELERY_UNIQUE_APP=UNREACHABLE):
        text = look("/admin/celery_unique/lock/", "redis-down")
    assert "The lock Redis cannot be reached" in text and "Traceback" not in text


def _unreachable() -> Any:
    from celery import Celery

    from celery_unique.testing import free_port

    app = Celery("admin-unreachable", set_as_current=False)
    app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    return app


unreachable_app = _unreachable()
amqp_app = Celery("admin-amqp", set_as_current=False, broker="amqp://guest@127.0.0.1:5672//")
