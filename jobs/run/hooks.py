"""Maintenance-mode hooks around a run: before it changes anything, and after it ends.

A hook is a shell command, or an http(s) URL that receives a POST. ``before_run`` runs before
anything changes (e.g. switch the app to maintenance mode); ``after_run`` runs whatever the
outcome (switch it back). Each is recorded as a step of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from typing import Any

from jobs.config import Target, redact
from jobs.errors import HookFailed


def run_hook(target: Target, which: str, hook: str, run_id: str, state: str) -> dict[str, Any]:
    """Run one hook; what it answered, for the ledger. HookFailed with one line otherwise."""
    info = {
        "RUNBOOK_RUN_ID": run_id,
        "RUNBOOK_TARGET": target.name,
        "RUNBOOK_STATE": state,
        "RUNBOOK_HOOK": which,
    }
    if hook.startswith(("http://", "https://")):
        body = json.dumps({k.removeprefix("RUNBOOK_").lower(): v for k, v in info.items()})
        request = urllib.request.Request(
            hook, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=target.hook_timeout_s) as resp:  # noqa: S310
                return {"http_status": resp.status}
        except urllib.error.HTTPError as exc:
            raise HookFailed(redact(f"{which} hook {hook} answered HTTP {exc.code}")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise HookFailed(redact(f"{which} hook {hook} failed: {reason}")) from None
    try:
        done = subprocess.run(
            hook,
            shell=True,
            env={**os.environ, **info},
            capture_output=True,
            text=True,
            timeout=target.hook_timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HookFailed(
            f"{which} hook timed out after {target.hook_timeout_s:.0f}s: {redact(hook)}"
        ) from None
    output = (done.stdout + done.stderr).strip().splitlines()
    last = redact(output[-1])[:200] if output else ""
    if done.returncode != 0:
        raise HookFailed(
            f"{which} hook exited {done.returncode}: {redact(hook)}"
            + (f" ({last})" if last else "")
        )
    return {"exit": 0, "output": last}
