"""The JSONL request log writer: queueing, rotation, disk errors, redaction."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from imageworks_proxy.observability.requestlog import RequestLog, redact_messages


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_records_are_written_as_jsonl_with_iso_timestamps_into_a_created_directory(tmp_path):
    path = tmp_path / "deep" / "er" / "chat.jsonl"
    rlog = RequestLog(str(path), 1_000_000)
    await rlog.start()
    rlog.submit({"ts": 1767225600.25, "request_id": "a", "n": 1})
    rlog.submit({"ts": 1767225601.0, "request_id": "b", "n": 2})
    await rlog.flush()
    await rlog.stop()
    assert read_lines(path) == [
        {"ts": "2026-01-01T00:00:00.250Z", "request_id": "a", "n": 1},
        {"ts": "2026-01-01T00:00:01.000Z", "request_id": "b", "n": 2},
    ]
    assert (rlog.written, rlog.dropped, rlog.write_errors) == (2, 0, 0)


async def test_stop_writes_everything_still_queued(tmp_path):
    path = tmp_path / "chat.jsonl"
    rlog = RequestLog(str(path), 10_000_000)
    await rlog.start()
    for i in range(500):
        rlog.submit({"n": i})
    await rlog.stop()  # no flush first
    assert [r["n"] for r in read_lines(path)] == list(range(500))


async def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"n": -1}\n')
    rlog = RequestLog(str(path), 1_000_000)
    await rlog.start()
    rlog.submit({"n": 0})
    await rlog.stop()
    assert [r["n"] for r in read_lines(path)] == [-1, 0]


async def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path):
    path = tmp_path / "chat.jsonl"
    rlog = RequestLog(str(path), 1_000_000, max_queue=10)
    await rlog.start()
    for i in range(25):  # no await in between: the writer cannot run, the queue fills
        rlog.submit({"n": i})
    assert rlog.dropped == 15
    await rlog.stop()
    assert [r["n"] for r in read_lines(path)] == list(range(10))
    assert rlog.written == 10


async def test_records_submitted_while_the_writer_is_not_running_are_counted_as_dropped(tmp_path):
    rlog = RequestLog(str(tmp_path / "chat.jsonl"), 1_000_000)
    rlog.submit({"n": 1})
    assert rlog.dropped == 1
    disabled = RequestLog("", 1_000_000)
    await disabled.start()
    disabled.submit({"n": 1})
    assert disabled.dropped == 0 and not disabled.enabled
    await disabled.stop()


async def test_one_rotation_keeps_every_record_across_the_two_generations(tmp_path):
    path = tmp_path / "chat.jsonl"
    record = {"request_id": "x" * 80}
    line_len = len(json.dumps({**record, "n": "000"}, separators=(",", ":"))) + 1
    rlog = RequestLog(str(path), max_bytes=line_len * 60)
    await rlog.start()
    for i in range(100):
        rlog.submit({**record, "n": f"{i:03d}"})
        if i % 7 == 0:
            await asyncio.sleep(0)  # let batches of different sizes form
    await rlog.stop()
    old, new = read_lines(Path(str(path) + ".1")), read_lines(path)
    assert rlog.rotations == 1
    assert [r["n"] for r in old + new] == [f"{i:03d}" for i in range(100)]
    assert path.stat().st_size <= rlog.max_bytes
    assert Path(str(path) + ".1").stat().st_size <= rlog.max_bytes


async def test_rotation_under_load_loses_only_the_generations_rotated_out(tmp_path):
    path = tmp_path / "chat.jsonl"
    rotated = Path(str(path) + ".1")
    rlog = RequestLog(str(path), max_bytes=4096)
    seq = itertools.count()

    async def producer(p: int) -> None:
        for i in range(200):
            rlog.submit({"seq": next(seq), "p": p, "pad": "y" * (i % 50)})
            if i % (3 + p) == 0:
                await asyncio.sleep(0)

    await rlog.start()
    await asyncio.gather(*(producer(p) for p in range(8)))
    await rlog.stop()
    assert rlog.dropped == 0 and rlog.write_errors == 0
    assert rlog.written == 1600
    assert rlog.rotations >= 5
    old, new = read_lines(rotated), read_lines(path)
    kept = old + new
    # The kept records are exactly the most recent ones, in submission order, with no gap.
    assert [r["seq"] for r in kept] == list(range(1600 - len(kept), 1600))
    # Each generation is under the limit, and .1 was rotated only when the next line would not fit.
    assert rotated.stat().st_size <= 4096 and path.stat().st_size <= 4096
    first_new = (json.dumps(new[0], separators=(",", ":")) + "\n").encode()
    assert rotated.stat().st_size + len(first_new) > 4096


async def test_a_disk_error_is_counted_and_logged_and_the_writer_recovers(tmp_path, caplog):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    path = blocker / "chat.jsonl"
    rlog = RequestLog(str(path), 1_000_000)
    await rlog.start()  # cannot open: warns, does not raise
    rlog.submit({"n": 1})
    rlog.submit({"n": 2})
    await rlog.flush()
    assert rlog.write_errors == 2 and rlog.written == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("not writable" in m or "cannot be opened" in m for m in messages)
    blocker.unlink()
    rlog.submit({"n": 3})
    await rlog.stop()
    assert [r["n"] for r in read_lines(path)] == [3]
    assert rlog.write_errors == 2 and rlog.written == 1


async def test_an_unencodable_record_is_counted_not_raised(tmp_path):
    path = tmp_path / "chat.jsonl"
    rlog = RequestLog(str(path), 1_000_000)
    await rlog.start()
    rlog.submit({"n": 1, "bad": {1: "non-string key"}})
    rlog.submit({"n": 2, "odd": object.__new__(type("Odd", (), {"__str__": lambda self: "odd"}))})
    await rlog.stop()
    assert [r["n"] for r in read_lines(path)] == [2]
    assert read_lines(path)[0]["odd"] == "odd"
    assert rlog.write_errors == 1


def test_redaction_replaces_inline_image_audio_and_file_data_and_keeps_text():
    png = "data:image/png;base64," + "A" * 998 + "=="
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": png, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.org/cat.jpg"}},
                {"type": "input_audio", "input_audio": {"data": "B" * 400, "format": "wav"}},
                {
                    "type": "file",
                    "file": {"file_data": "data:application/pdf;base64," + "C" * 40, "filename": "a.pdf"},
                },
            ],
        },
    ]
    out = redact_messages(messages)
    parts = out[1]["content"]
    assert out[0] == {"role": "system", "content": "be brief"}
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1] == {"type": "image_url", "image_url": {"url": "<image/png 748 bytes>", "detail": "low"}}
    assert parts[2]["image_url"]["url"] == "https://example.org/cat.jpg"
    assert parts[3]["input_audio"] == {"data": "<audio/wav 300 bytes>", "format": "wav"}
    assert parts[4]["file"] == {"file_data": "<application/pdf 30 bytes>", "filename": "a.pdf"}
    assert "AAAA" not in json.dumps(out)
    assert messages[1]["content"][1]["image_url"]["url"] == png  # the request itself is untouched


async def test_records_with_huge_values_are_bounded_and_cannot_rotate_earlier_records_away(tmp_path):
    path = tmp_path / "chat.jsonl"
    rlog = RequestLog(str(path), max_bytes=1_000_000)
    await rlog.start()
    for i in range(20):
        rlog.submit({"n": i, "model": "m-echo", "status": 200})
    for i in range(3):  # a client sending megabyte model names, prompts kept in the log
        rlog.submit({"n": 20 + i, "model": "m" * 1_000_000, "status": 404,
                     "messages": [{"role": "user", "content": "x" * 2_000_000}], "reply": None})
    await rlog.stop()
    records = read_lines(path)
    assert [r["n"] for r in records] == list(range(23))
    assert rlog.rotations == 0 and path.stat().st_size < 1_000_000 / 4
    big = records[-1]
    assert big["status"] == 404 and big["record_truncated"] is True
    assert big["model"].startswith("mmm") and len(big["model"]) < 600
    assert isinstance(big["messages"], str) and "omitted" in big["messages"]
    assert "record_truncated" not in records[0] and records[0]["model"] == "m-echo"


async def test_a_record_with_long_prompts_under_the_record_limit_is_kept_whole(tmp_path):
    path = tmp_path / "chat.jsonl"
    rlog = RequestLog(str(path), max_bytes=25_000_000)
    await rlog.start()
    messages = [{"role": "user", "content": "y" * 200_000}]
    rlog.submit({"n": 1, "messages": messages})
    await rlog.stop()
    assert read_lines(path) == [{"n": 1, "messages": messages}]


async def test_a_log_file_deleted_from_outside_is_created_again(tmp_path):
    path = tmp_path / "chat.jsonl"
    rlog = RequestLog(str(path), 1_000_000)
    await rlog.start()
    rlog.submit({"n": 1})
    await rlog.flush()
    path.unlink()
    rlog.submit({"n": 2})
    rlog.submit({"n": 3})
    await rlog.stop()
    assert [r["n"] for r in read_lines(path)] == [2, 3]
    assert rlog.written == 3 and rlog.write_errors == 0


async def test_a_log_file_moved_aside_from_outside_is_replaced_by_a_new_one(tmp_path):
    path = tmp_path / "chat.jsonl"
    moved = tmp_path / "chat.jsonl.2026-01-01"
    rlog = RequestLog(str(path), 1_000_000)
    await rlog.start()
    rlog.submit({"n": 1})
    await rlog.flush()
    path.rename(moved)  # what logrotate does without copytruncate
    path.write_text('{"n": 0}\n')  # and some other tool creates the file again
    rlog.submit({"n": 2})
    await rlog.stop()
    assert [r["n"] for r in read_lines(moved)] == [1]
    assert [r["n"] for r in read_lines(path)] == [0, 2]
