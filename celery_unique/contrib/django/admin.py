"""The "celery-unique" section of the Django admin: locks, stored outcomes, open fan-ins.

Nothing is read from the database: each page reads Redis through
:mod:`celery_unique.browse` (bounded work per page, a cursor to the next).
Each action asks for confirmation, needs its own permission, is CSRF-protected
(the admin's views are) and is written to the admin log. A Redis that cannot
be reached gives one error page (503), not a traceback.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from celery.backends.base import DisabledBackend
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.admin.utils import quote, unquote
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from redis.exceptions import ResponseError

from celery_unique import browse
from celery_unique.clients import REDIS_ERRORS, describe, location
from celery_unique.conf import get_conf
from celery_unique.contrib.django.checks import celery_app
from celery_unique.contrib.django.models import FanIn, Lock, Outcome
from celery_unique.exceptions import ConfigurationError, LockBackendError, UniqueError
from celery_unique.inspect import task_of
from celery_unique.keys import digest_of_key

_FAILURES: tuple[type[Exception], ...] = (*REDIS_ERRORS, LockBackendError, ConfigurationError)
#: Rows per page.
PAGE_SIZE = 100


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} s"


@dataclass(frozen=True)
class Shown:
    """A row as the list shows it."""

    choice: str  # what a selection posts back (the key and the digest of its value, or a token)
    cells: list[str]
    link: str | None = None  # the row's own page


class RedisAdmin(admin.ModelAdmin):  # type: ignore[misc]
    """A list read from Redis with one action; subclasses say what and how."""

    title = ""
    columns: tuple[str, ...] = ()
    action_label = ""
    action_permission = ""
    action_done = ""  # what the log and the message say, with {label}
    log_flag = DELETION
    list_template = "admin/celery_unique/list.html"
    has_state_filter = False
    has_task_filter = True
    has_search = False

    # Nothing is added, changed or deleted the database's way.
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_action_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm(f"{self.opts.app_label}.{self.action_permission}"))

    def get_urls(self) -> list[Any]:
        name = f"{self.opts.app_label}_{self.opts.model_name}"
        view = self.admin_site.admin_view
        return [
            path("", view(self.list_view), name=f"{name}_changelist"),
            path("act/", view(self.act_view), name=f"{name}_act"),
            *self.more_urls(name),
        ]

    def more_urls(self, name: str) -> list[Any]:
        return []

    def url(self, view: str, *args: Any) -> str:
        return str(reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_{view}", args=args))

    # -- what a subclass says ------------------------------------------------

    def page(self, app: Any, query: Any) -> browse.Page[Any]:
        raise NotImplementedError

    def shown(self, row: Any) -> Shown:
        raise NotImplementedError

    def act(self, app: Any, choice: str) -> tuple[bool, str]:
        """Take the action on one selected row: (done, what the person is told)."""
        raise NotImplementedError

    # -- views ---------------------------------------------------------------

    def _context(self, request: HttpRequest, **more: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": self.title,
            "changelist_url": self.url("changelist"),
            **more,
        }

    def guarded(self, request: HttpRequest, read: Callable[[Any], HttpResponse]) -> HttpResponse:
        """``read(app)``, or one error page: Redis cannot be reached, refused a command,
        or celery-unique has no Redis (its settings) for the app."""
        try:
            app = celery_app()
            return read(app)
        except _FAILURES as error:
            if isinstance(error, ConfigurationError):
                headline, said = "celery-unique is not configured for this app", str(error)
            else:
                try:
                    where = location(get_conf(app).redis_url or "")
                except UniqueError:
                    where = ""
                said = describe(error, where)
                refused = isinstance(error, ResponseError)
                headline = (
                    "The lock Redis refused a command" if refused else "The lock Redis cannot be reached"
                )
            context = self._context(request, headline=headline, error=said)
            return TemplateResponse(request, "admin/celery_unique/unavailable.html", context, status=503)

    def list_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        query = request.GET
        try:  # a cursor or a state typed by hand
            browse.parse_cursor(query.get("cursor", ""))
            browse.check_state(query.get("state") or None)
        except ValueError as error:
            messages.error(request, str(error))
            return HttpResponseRedirect(self.url("changelist"))

        def read(app: Any) -> HttpResponse:
            page = self.page(app, query)
            kept = {k: query[k] for k in ("task", "state", "q") if query.get(k)}
            number = int(query.get("page", "1")) if query.get("page", "1").isdigit() else 1
            following = None
            if page.cursor is not None:
                following = "?" + urlencode({**kept, "cursor": page.cursor, "page": number + 1})
            context = self._context(
                request,
                columns=self.columns,
                rows=[self.shown(row) for row in page.rows],
                page=page,
                number=number,
                milliseconds=page.seconds * 1000,
                next_url=following,
                first_url="?" + urlencode(kept) if number > 1 else None,
                tasks=browse.task_names(app) if self.has_task_filter else None,
                states=browse.STATES if self.has_state_filter else None,
                has_search=self.has_search,
                chosen=kept,
                can_act=self.has_action_permission(request),
                action_label=self.action_label,
                act_url=self.url("act"),
            )
            return TemplateResponse(request, self.list_template, context)

        return self.guarded(request, read)

    def act_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_action_permission(request):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseRedirect(self.url("changelist"))
        chosen = request.POST.getlist("selected")
        if not chosen:
            messages.warning(request, "Nothing was selected: nothing was done.")
            return HttpResponseRedirect(self.url("changelist"))
        if request.POST.get("confirmed") != "yes":
            labels = [self.label_of(choice) for choice in chosen]
            context = self._context(
                request,
                title=f"{self.action_label}: are you sure?",
                chosen=list(zip(chosen, labels, strict=True)),
                action_label=self.action_label,
                act_url=self.url("act"),
            )
            return TemplateResponse(request, "admin/celery_unique/confirm.html", context)

        def act(app: Any) -> HttpResponse:
            content_type = ContentType.objects.get_for_model(self.model, for_concrete_model=False)
            for choice in chosen:
                done, said = self.act(app, choice)
                if done:
                    # Written directly: LogEntryManager.log_action() is deprecated from Django 5.1.
                    LogEntry.objects.create(
                        user_id=request.user.pk,
                        content_type_id=content_type.pk,
                        object_id=self.object_id(choice),
                        object_repr=self.label_of(choice)[:200],
                        action_flag=self.log_flag,
                        change_message=said,
                    )
                messages.add_message(request, messages.SUCCESS if done else messages.WARNING, said)
            return HttpResponseRedirect(self.url("changelist"))

        return self.guarded(request, act)

    def label_of(self, choice: str) -> str:
        """What the confirmation page and the admin log say of a selection."""
        key = self.object_id(choice)
        try:
            return f"{task_of(key)} {key.rpartition(':')[2]} {digest_of_key(key)[:16]}"
        except ValueError:  # not a key of ours (posted by hand): the action says so
            return key

    def object_id(self, choice: str) -> str:
        """The key a selection names (it ends with "|" and the digest of its value)."""
        return choice.rpartition("|")[0] or choice


class LockAdmin(RedisAdmin):
    title = "Locks"
    columns = ("Task", "State", "Worker", "Holder task id", "Age", "TTL", "Lifetime", "Kind", "Key digest")
    action_label = "Release selected locks"
    action_permission = "release_lock"
    has_state_filter = True
    has_search = True

    def page(self, app: Any, query: Any) -> browse.Page[Any]:
        return browse.lock_page(
            app,
            task_name=query.get("task") or None,
            state=query.get("state") or None,
            holder=(query.get("q") or "").strip() or None,
            cursor=query.get("cursor", ""),
            size=PAGE_SIZE,
        )

    def shown(self, row: browse.LockRow) -> Shown:
        info = row.info
        return Shown(
            choice=f"{info.key}|{row.value_digest}",
            cells=[
                info.task_name,
                row.state,
                row.worker or "-",
                info.holder or "-",
                _seconds(info.age),
                _seconds(info.ttl),
                info.lifetime,
                info.kind,
                info.digest[:16],
            ],
            link=self.url("change", quote(info.key)),
        )

    def more_urls(self, name: str) -> list[Any]:
        return [path("<path:object_id>/", self.admin_site.admin_view(self.lock_view), name=f"{name}_change")]

    def lock_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        key = unquote(object_id)

        def read(app: Any) -> HttpResponse:
            try:
                row = browse.lock(app, key)
            except ConfigurationError:
                raise
            except ValueError:
                raise Http404("not a lock of this app") from None
            if row is None:
                messages.warning(request, f"The lock {key} is gone (released, or its TTL ended).")
                return HttpResponseRedirect(self.url("changelist"))
            result_state, result_url = _holder_result(app, row.info.holder)
            context = self._context(
                request,
                title=f"Lock of {row.info.task_name}",
                row=row,
                shown=self.shown(row),
                fields=list(zip(self.columns, self.shown(row).cells, strict=True)),
                result_state=result_state,
                result_url=result_url,
                can_act=self.has_action_permission(request),
                action_label="Release this lock",
                act_url=self.url("act"),
            )
            return TemplateResponse(request, "admin/celery_unique/lock.html", context)

        return self.guarded(request, read)

    def act(self, app: Any, choice: str) -> tuple[bool, str]:
        return _delete_if_unchanged(
            app,
            choice,
            "Released {key} (owner-checked).",
            "Not released: {key} is no longer held by the holder shown (released, expired, or taken "
            "by another call since the page was read).",
        )


def _delete_if_unchanged(app: Any, choice: str, done: str, not_done: str) -> tuple[bool, str]:
    """Release a lock or forget an outcome (``choice``: its key, "|", the digest of the
    value shown) if the key still holds that value: (done, what the person is told)."""
    key, _, digest = choice.rpartition("|")
    try:
        deleted = browse.release_if_held(app, key, digest)
    except ValueError as error:
        return False, str(error)
    return deleted, (done if deleted else not_done).format(key=key)


def _holder_result(app: Any, task_id: str | None) -> tuple[str | None, str | None]:
    """(the holder's state in the result backend, a link to it in this admin), each
    None where not known: no result backend, or no page for its results."""
    if not task_id or isinstance(app.backend, DisabledBackend):
        return None, None
    try:
        state = str(app.AsyncResult(task_id).state)
    except Exception as error:  # any backend's failure: the page still shows the lock
        state = f"unknown ({type(error).__name__})"
    try:
        url = reverse("admin:django_celery_results_taskresult_changelist") + "?" + urlencode({"q": task_id})
    except NoReverseMatch:
        url = None
    return state, url


class OutcomeAdmin(RedisAdmin):
    title = "Stored outcomes"
    columns = ("Task", "Result", "Run started", "TTL", "Task id", "Key digest")
    action_label = "Forget selected outcomes"
    action_permission = "forget_outcome"

    def page(self, app: Any, query: Any) -> browse.Page[Any]:
        return browse.outcome_page(
            app, task_name=query.get("task") or None, cursor=query.get("cursor", ""), size=PAGE_SIZE
        )

    def shown(self, row: browse.OutcomeRow) -> Shown:
        info = row.info
        result = {True: "success", False: "failure", None: "? (does not open)"}[row.succeeded]
        return Shown(
            choice=f"{info.key}|{row.value_digest}",
            cells=[
                info.task_name,
                result,
                _when(row.started),
                _seconds(info.ttl),
                info.holder or "-",
                info.digest[:16],
            ],
        )

    def act(self, app: Any, choice: str) -> tuple[bool, str]:
        return _delete_if_unchanged(
            app,
            choice,
            "Forgot {key}: the next call of its key runs.",
            "Not forgotten: {key} changed or is gone since the page was read.",
        )


class FanInAdmin(RedisAdmin):
    title = "Open fan-ins"
    columns = ("Token", "Callback", "Reported", "Failed", "Deadline", "TTL")
    action_label = "Expire selected fan-ins"
    action_permission = "expire_fan_in"
    log_flag = CHANGE
    has_task_filter = False

    def page(self, app: Any, query: Any) -> browse.Page[Any]:
        return browse.fan_in_page(app, cursor=query.get("cursor", ""), size=PAGE_SIZE)

    def shown(self, row: browse.FanInRow) -> Shown:
        progress = "?" if row.parts is None else f"{row.reported} of {row.parts}"
        return Shown(
            choice=row.token,
            cells=[
                row.token,
                row.callback,
                progress,
                str(row.failed),
                _when(row.deadline),
                _seconds(row.ttl),
            ],
        )

    def object_id(self, choice: str) -> str:
        return choice  # a token

    def label_of(self, choice: str) -> str:
        return f"fan-in {choice}"

    def act(self, app: Any, choice: str) -> tuple[bool, str]:
        try:
            missing = browse.expire_fan_in(app, choice)
        except (UniqueError, ValueError) as error:  # a token posted by hand
            return False, f"Not expired: {error}"
        if missing is None:
            return False, f"Not expired: fan-in {choice} is no longer open."
        return True, f"Expired fan-in {choice}: its errback fires with {len(missing)} part(s) missing."


admin.site.register(Lock, LockAdmin)
admin.site.register(Outcome, OutcomeAdmin)
admin.site.register(FanIn, FanInAdmin)
