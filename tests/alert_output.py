#!/usr/bin/env python3
"""An independent reader of `portwatch alert`'s output, written from the monitoring-plugins
development guidelines (https://www.monitoring-plugins.org/doc/guidelines.html, "Plugin Output" and
"Performance data"), not from portwatch's code. Python 3.11 standard library only.

    portwatch alert ... | python3 tests/alert_output.py EXIT_CODE

reads the output (stdout: one line), checks it and prints what it read as JSON:
{"state": "OK", "summary": "...", "perf": [{"label", "value", "uom", "warn", "crit", "min", "max"}]},
where warn and crit are [start, end, inside] (start null for ~, end null for infinity). It exits 1
and says why on anything the guidelines do not allow:
- not exactly one line; not `PORTWATCH <STATE> - <summary>`; a state word that is not the exit code's
  (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN);
- performance data not `'label'=value[UOM];[warn];[crit];[min];[max]` separated by spaces: a label
  with `=` or an unescaped quote, unquoted with a space; a number not in the C locale (a comma, an
  exponent, thousands separators); a UOM other than none, s, ms, us, %, B, KB, MB, TB, c; a range
  not in the range syntax; a value below its min;
- a state that the thresholds in the performance data contradict: the state is the worst, over the
  values that carry thresholds, of CRITICAL when the value is in its critical alert range, else
  WARNING when in its warning one, else OK (the guidelines' range semantics: outside start..end
  alerts, ends included in the range; `@` inverts).
"""

import json
import re
import sys

STATES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
UOMS = {"", "s", "ms", "us", "%", "B", "KB", "MB", "TB", "c"}
# C locale: an optional minus, digits, an optional point and digits. No exponent, no separators.
NUMBER = r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
NUMBER_RE = re.compile(rf"^{NUMBER}$")
RANGE_RE = re.compile(rf"^(@)?(?:(~|{NUMBER})?:)?({NUMBER})?$")


class Bad(Exception):
    pass


def number(text, what):
    if not NUMBER_RE.match(text):
        raise Bad(f"{what} {text!r} is not a number in the C locale")
    return float(text)


def parse_range(text, what):
    """[start, end, inside] of a threshold range; None for an empty field."""
    if text == "":
        return None
    m = RANGE_RE.match(text)
    if not m or text in ("@", ":", "@:"):
        raise Bad(f"{what} {text!r} is not a range")
    inside, start, end = m.group(1) is not None, m.group(2), m.group(3)
    if ":" not in text:
        start = "0"
    start = None if start == "~" else float(start or 0)
    end = None if end is None else float(end)
    if start is not None and end is not None and start > end:
        raise Bad(f"{what} {text!r}: its start is above its end")
    return [start, end, inside]


def alerts(rng, value):
    start, end, inside = rng
    within = (start is None or start <= value) and (end is None or value <= end)
    return within == inside


def split_perfdata(text):
    """The space-separated items, a quoted label possibly holding spaces and '' for a quote."""
    items, i = [], 0
    while i < len(text):
        if text[i] == " ":
            i += 1
            continue
        j = i
        if text[i] == "'":
            j = i + 1
            while True:
                k = text.find("'", j)
                if k < 0:
                    raise Bad(f"an unterminated quoted label in {text[i:]!r}")
                if text[k + 1 : k + 2] == "'":
                    j = k + 2
                    continue
                j = k + 1
                break
            if text[j : j + 1] != "=":
                raise Bad(f"a quoted label not followed by '=' in {text[i:]!r}")
        k = text.find(" ", j)
        k = len(text) if k < 0 else k
        items.append(text[i:k])
        i = k
    return items


def parse_item(item):
    if item.startswith("'"):
        end = 1
        while True:
            q = item.index("'", end)
            if item[q + 1 : q + 2] == "'":
                end = q + 2
                continue
            break
        label, rest = item[1:q].replace("''", "'"), item[q + 2 :]
    else:
        if "=" not in item:
            raise Bad(f"perfdata item {item!r} has no '='")
        label, rest = item.split("=", 1)
    if label == "" or "=" in label:
        raise Bad(f"bad label {label!r}")
    fields = rest.split(";")
    if len(fields) > 5:
        raise Bad(f"{item!r}: more than value;warn;crit;min;max")
    fields += [""] * (5 - len(fields))
    m = re.match(rf"^({NUMBER})([^0-9;]*)$", fields[0])
    if not m:
        raise Bad(f"{item!r}: the value {fields[0]!r} is not a number in the C locale with a UOM")
    value, uom = float(m.group(1)), m.group(2)
    if uom not in UOMS:
        raise Bad(f"{item!r}: UOM {uom!r} is not one of {sorted(UOMS)}")
    perf = {
        "label": label,
        "value": value,
        "uom": uom,
        "warn": parse_range(fields[1], f"{item!r}: warn"),
        "crit": parse_range(fields[2], f"{item!r}: crit"),
        "min": number(fields[3], f"{item!r}: min") if fields[3] else None,
        "max": number(fields[4], f"{item!r}: max") if fields[4] else None,
    }
    if perf["min"] is not None and value < perf["min"]:
        raise Bad(f"{item!r}: the value is below its min")
    if perf["max"] is not None and value > perf["max"]:
        raise Bad(f"{item!r}: the value is above its max")
    return perf


def read(output, code):
    if code not in STATES:
        raise Bad(f"exit code {code} is not 0, 1, 2 or 3")
    if not output.endswith("\n") or output.count("\n") != 1:
        raise Bad(f"not exactly one line: {output!r}")
    line = output[:-1]
    text, _, perfdata = line.partition("|")
    m = re.match(r"^PORTWATCH (OK|WARNING|CRITICAL|UNKNOWN) - (\S.*)$", text.rstrip())
    if not m:
        raise Bad(f"not 'PORTWATCH STATE - summary': {text!r}")
    state, summary = m.group(1), m.group(2)
    if state != STATES[code]:
        raise Bad(f"the state word is {state} but the exit code {code} ({STATES[code]})")
    perf = [parse_item(i) for i in split_perfdata(perfdata.strip())] if perfdata else []
    labels = [p["label"] for p in perf]
    if len(set(labels)) != len(labels):
        raise Bad("a label twice")
    if state != "UNKNOWN":
        worst = 0
        for p in perf:
            if p["crit"] is not None and alerts(p["crit"], p["value"]):
                worst = max(worst, 2)
            elif p["warn"] is not None and alerts(p["warn"], p["value"]):
                worst = max(worst, 1)
        if STATES[worst] != state:
            raise Bad(f"the thresholds in the perfdata make it {STATES[worst]}, the plugin says {state}")
    return {"state": state, "summary": summary, "perf": perf}


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        parsed = read(sys.stdin.read(), int(sys.argv[1]))
    except (Bad, ValueError) as e:
        print(f"alert_output.py: {e}", file=sys.stderr)
        return 1
    print(json.dumps(parsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
