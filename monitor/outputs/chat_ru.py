# ruff: noqa: RUF001 - Russian text: its Cyrillic letters are meant, not look-alikes
"""Russian texts of the chat formats (``[[webhooks]] language = "ru"``).

Pure: from a stored event body to a (headline, detail) pair, as
:func:`monitor.outputs.webhooks.render.summary` does in English.  The
sentence is built from the event's fields (kind, severity, value, limit,
unit, projected, period, scope, meters), not translated from its English
``message``; an event kind without a template keeps that English message
under a Russian headline.  Numbers are written with a decimal comma.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

SEVERITY = {"critical": "КРИТИЧНО", "warning": "ВНИМАНИЕ", "info": "ИНФО"}
KIND = {
    "alert.firing": "тревога",
    "alert.resolved": "тревога снята",
    "order.issued": "приказ",
    "order.confirmed": "приказ выполнен",
    "order.failed": "приказ не выполнен",
    "order.held": "нагрузка удержана",
    "meter.stale": "счётчик молчит",
    "meter.recovered": "счётчик на связи",
    "meter.unknown": "неизвестное устройство",
    "notify.test": "проверка",
}
UNITS = {"kWh": "кВт·ч", "kW": "кВт", "W": "Вт", "s": "с", "meters": "счётч."}
ACTION = {"shutdown": "отключение", "resume": "включение", "limit": "снижение мощности"}


def number(value: Any, fmt: Callable[[Any], str] = str) -> str:
    """``value`` as ``fmt`` writes it, with a decimal comma."""
    text = fmt(value)
    return text.replace(".", ",") if isinstance(value, float | int) else text


def _unit(body: Mapping[str, Any]) -> str:
    unit = str(body.get("unit") or "")
    return f" {UNITS.get(unit, unit)}" if unit else ""


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} с"
    if s < 7200:
        return f"{s // 60} мин"
    if s < 172800:
        return f"{s // 3600} ч {s % 3600 // 60} мин"
    return f"{s // 86400} сут"


def scope_of(scope: str) -> str:
    """A scope in the genitive: ``site`` -> всей площадки, ``group:a`` -> группы a."""
    kind, _, name = scope.partition(":")
    if scope == "site":
        return "всей площадки"
    if kind == "group":
        return f"группы {name}"
    if kind == "meter":
        return f"счётчика {name}"
    return scope


def _meters(body: Mapping[str, Any]) -> str:
    ms = body.get("meters")
    if not isinstance(ms, Sequence) or isinstance(ms, str) or not ms:
        return ""
    shown = ", ".join(str(m) for m in ms[:10])
    return f"; счётчики: {shown}" + (f" (и ещё {len(ms) - 10})" if len(ms) > 10 else "")


def _figures(body: Mapping[str, Any], fmt: Callable[[Any], str]) -> str:
    value, limit, unit = body.get("value"), body.get("limit"), _unit(body)
    if value is None or limit is None:
        return ""
    out = f"{number(value, fmt)} из {number(limit, fmt)}{unit}"
    if isinstance(value, int | float) and isinstance(limit, int | float) and limit:
        out += f" ({number(round(100 * value / limit, 1), fmt)} %)"
    if body.get("projected") is not None:
        out += f", прогноз {number(body['projected'], fmt)}{unit}"
    if body.get("period"):
        out += f", период {body['period']}"
    return out


def _message(body: Mapping[str, Any], fmt: Callable[[Any], str]) -> str:
    kind = str(body.get("kind", ""))
    severity = str(body.get("severity", "info"))
    rule = f"«{body['rule']}»" if body.get("rule") else ""
    raw_scope = str(body.get("scope") or "")
    scope = scope_of(raw_scope)
    figures = _figures(body, fmt)
    meter = raw_scope.removeprefix("meter:")
    if kind == "alert.firing":
        if severity == "critical":
            head = f"Нарушено правило {rule} для {scope}"
        else:
            head = f"Предупреждение по правилу {rule} для {scope}"
        return head + (f": {figures}" if figures else "")
    if kind == "alert.resolved":
        return f"Правило {rule} для {scope} снова соблюдается" + (
            f": {figures}" if figures else "")
    if kind.startswith("order."):
        action = ACTION.get(str(body.get("action", "")), str(body.get("action", "")))
        target = (f" до {number(body['target_kw'], fmt)} кВт"
                  if body.get("target_kw") is not None else "")
        dry = " (пробный режим dry_run: ничего не отправлено)" if body.get("dry_run") else ""
        cause = f" (правило {rule})" if rule else " (вручную, оператор)"
        text = {
            "order.issued": f"Приказ на {action}{target} {scope}{cause}{dry}",
            "order.confirmed": f"Приказ на {action} {scope} выполнен: подтверждено "
                               "показаниями счётчиков",
            "order.failed": f"Приказ на {action} {scope} НЕ выполнен: счётчики не "
                            "подтвердили снижение нагрузки; проверьте оборудование",
            "order.held": f"Правило {rule} снова соблюдается, но нагрузка {scope} остаётся "
                          f"отключённой; включить: energy-monitor orders resume {raw_scope}",
        }.get(kind, f"{kind}: {body.get('message', '')}")
        return text + _meters(body)
    if kind == "meter.stale":
        value, limit = body.get("value"), body.get("limit")
        if value is None:
            return f"Счётчик {meter} ни разу не передал данные"
        allowed = f" (допустимо {_duration(float(limit))})" if limit is not None else ""
        return f"Счётчик {meter} молчит {_duration(float(value))}{allowed}"
    if kind == "meter.recovered":
        return f"Счётчик {meter} снова передаёт данные"
    if kind == "meter.unknown":
        return (f"Неизвестное устройство передаёт данные как счётчик {meter}: оно вне всех "
                "групп и без управления; добавьте его в [[meters]] или [[meter_patterns]]")
    if kind == "notify.test":
        return f"Тестовое сообщение energy-monitor, площадка {body.get('site', '')}: " \
               "вебхук работает"
    return str(body.get("message", ""))


def summary(body: Mapping[str, Any], emoji: str,
            fmt: Callable[[Any], str] = str) -> tuple[str, str]:
    """The Russian (headline, detail) of ``body``; ``emoji`` and the number format ``fmt``
    are the English summary's, so both languages show the same figures."""
    kind = str(body.get("kind", "event"))
    severity = str(body.get("severity", "info"))
    where = " · ".join(str(body[k]) for k in ("site", "rule", "scope")
                       if body.get(k) not in (None, ""))
    headline = (f"{emoji} {SEVERITY.get(severity, severity.upper())} · {KIND.get(kind, kind)}"
                + (f" · {where}" if where else ""))
    lines = [_message(body, fmt)]
    lines.append(f"время {body.get('at', '?')} · событие {body.get('event_id', '?')}")
    return headline, "\n".join(ln for ln in lines if ln)
