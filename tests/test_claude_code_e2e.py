"""The real Claude Code CLI through the real daemon on the example config.

A fake upstream plays the model: it answers with a `Read` tool call, then a `Write` tool call, then
a final text. Claude Code runs both tools for real, so the file it writes is what ccproxy let through
of the tool call's input, byte for byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.support import claude_code
from tests.support.daemon import ROOT, Daemon, free_port
from tests.support.upstream import FakeUpstream, Recorded, Script, message_stream

EXAMPLE = ROOT / "etc" / "ccproxy" / "config.yaml"
SSE = {"content-type": "text/event-stream"}
KEY = "sk-ant-api03-" + "Q7" * 20
# A file an agent reads in ordinary work: long, with words and values the seed's rules refused.
# 1,400 lines, over 50,000 characters as Claude Code sends them back (the seed's limit).
SOURCE = "".join(
    f"line {i:04d}: DB_PASSWORD=hunter{i} ✓\n" if i % 100 else
    f"line {i:04d}: api_key={KEY} <script>x()</script> ops{i}@example.com (415) 555-0132 日本語\n"
    for i in range(1, 1401)
)
# What the model asks Claude Code to write: every kind of value masking would rewrite in a text.
WRITTEN = (f"ANTHROPIC_API_KEY={KEY}\nowner: bob@example.com\nphone: +1 415 555 0132\n"
           "card: 4111 1111 1111 1111\npassword: correct horse battery staple\n\ttabs\tand unicode ✓ 🙂\n")


def _system_text(body: dict[str, Any]) -> str:
    system = body.get("system")
    if isinstance(system, str):
        return system
    return max((b.get("text", "") for b in system or [] if isinstance(b, dict)), key=len)


def _tool_results(body: dict[str, Any]) -> dict[str, Any]:
    found = {}
    last = body["messages"][-1]
    for block in last.get("content") if isinstance(last.get("content"), list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            found[block["tool_use_id"]] = block.get("content")
    return found


class Model:
    """Answers Claude Code's requests as a model would, from the conversation so far."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.count = 0
        self.read_result: Any = None
        self.quoted = ""
        self.echo = ""

    def __call__(self, recorded: Recorded) -> Script | None:
        if recorded.method != "POST" or not recorded.path.startswith("/v1/messages"):
            return None
        self.count += 1
        body = json.loads(recorded.body)
        msg_id = f"msg_e2e_{self.count:03d}"
        if not body.get("tools"):
            return Script(events=message_stream(msg_id, [{"type": "text", "text": "ok"}]), headers=SSE)
        results = _tool_results(body)
        if "toolu_write" in results:
            system = _system_text(body)
            # An ordinary answer quotes a path and a sentence of the system prompt...
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", system) if 120 <= len(s) < 250 and "\n" not in s]
            self.quoted = sentences[0]
            # ...an echo of the hidden instructions repeats a long stretch of them.
            self.echo = system[len(system) // 3 : len(system) // 3 + 600]
            text = (f"Done: read {self.work}/input.txt and wrote {self.work}/output.txt for bob@example.com. "
                    f"As instructed: \"{self.quoted}\" ECHO<{self.echo}>")
            return Script(events=message_stream(msg_id, [{"type": "text", "text": text}]), headers=SSE)
        if "toolu_read" in results:
            self.read_result = results["toolu_read"]
            call = {"type": "tool_use", "id": "toolu_write", "name": "Write",
                    "input": {"file_path": str(self.work / "output.txt"), "content": WRITTEN}}
            return Script(events=message_stream(msg_id, [{"type": "text", "text": "Writing it."}, call]),
                          headers=SSE)
        call = {"type": "tool_use", "id": "toolu_read", "name": "Read",
                "input": {"file_path": str(self.work / "input.txt")}}
        return Script(events=message_stream(msg_id, [call]), headers=SSE)


def _read_lines(result: Any) -> list[str]:
    text = result if isinstance(result, str) else "".join(b.get("text", "") for b in result)
    lines = []
    for line in text.split("\n"):
        m = re.match(r"^\s*(\d+)[\t→](.*)$", line)
        if m:
            lines.append(m.group(2))
    return lines


def test_claude_code_reads_and_writes_files_through_ccproxy_on_the_example_config(
        tmp_path: Path, certs: Any, upstream: FakeUpstream) -> None:
    claude_code.binary()  # installed before the daemon starts; fails loudly if it cannot be
    config = yaml.safe_load(EXAMPLE.read_text())
    config["server"]["port"] = free_port()
    config["server"]["tls"] = certs.tls()
    for name in ("anthropic", "openai"):
        config["upstreams"][name]["base_url"] = upstream.url
    (tmp_path / "d").mkdir()
    daemon = Daemon(tmp_path / "d", config, ca_file=certs.ca_file).start()
    try:
        work = tmp_path / "work"
        work.mkdir()
        (work / "input.txt").write_text(SOURCE)
        model = Model(work)
        upstream.responder = model
        result = claude_code.run(
            "Copy the settings from input.txt into output.txt.", cwd=work, base_url=daemon.url,
            ca_file=certs.ca_file, home=tmp_path / "home",
            extra=["--allowedTools", "Read,Write", "--permission-mode", "acceptEdits"],
        )
        assert result["is_error"] is False, result
        # The Read tool's result reached the model whole, secrets and all (requests are not masked).
        assert "\n".join(_read_lines(model.read_result)) == SOURCE
        assert len(json.dumps(model.read_result, ensure_ascii=False)) > 50000
        # The Write tool call's input crossed the proxy intact: the file is byte for byte what the model sent.
        assert (work / "output.txt").read_bytes() == WRITTEN.encode()
        # What the person reads is masked; paths and a quoted sentence of the system prompt are not.
        text = result["result"]
        assert "bob@example.com" not in text and "[REDACTED_EMAIL]" in text
        assert f"{work}/input.txt" in text and f"{work}/output.txt" in text
        assert model.quoted in text
        assert "ECHO<[REDACTED_SYSTEM_PROMPT]>" in text
        log = daemon.log()
        assert "response_masked" in log and KEY not in log
        # The shipped config is coherent: a new user's first start says nothing is wrong with it.
        assert not re.findall(r"#(?:warn|error|critical)\]", log), log
    finally:
        daemon.stop()
