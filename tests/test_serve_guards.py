"""What guards the serve app and the farm monitor, tested fast (no Ray): private data and farm dirs, the Host
check against DNS rebinding, messages that hide server paths but keep routes, per-key upload quotas and the
sweep of partial uploads, the event streams' shared poll and per-key cap, and playlists refused as videos.
The same guards on a running server: tests/test_serve.py."""

from __future__ import annotations

import asyncio
import gc
import os
import stat
import subprocess
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from longtake.cli import main
from longtake.cluster import farm
from longtake.private import private_dir
from longtake.media import open_video, probe_media
from longtake.request import RequestError
from longtake.private import default_data_dir
from longtake.serve import load_or_create_secret
from longtake.serve.events import JobEvents, TooManyStreams
from longtake.serve.farm_monitor import build_monitor
from longtake.serve.files import FileStore, owner_of
from longtake.serve.manager import public_message
from longtake.serve.pages import served_hosts
from longtake.video import VideoWriter, ffmpeg_exe

NOBODY = 65534


# -- private directories (#22) ------------------------------------------------------------------------------

def _shared(path, mode=0o775):
    path.mkdir()
    path.chmod(mode)
    return path


def _foreign(path):
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)  # (the tests run as root, as CI does)
    return path


def test_a_missing_dir_is_created_owner_only(tmp_path):
    made = private_dir(tmp_path / "a" / "serve", "data_dir")
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert private_dir(made, "data_dir") == made  # an existing private one is fine
    assert not (tmp_path / "absent").exists() and private_dir(tmp_path / "absent", "farm_dir", create=False)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("mode,says", [(0o775, "writable by its group"), (0o757, "writable by others"),
                                       (0o777, "writable by its group and others")])
def test_a_group_or_world_writable_dir_is_refused(tmp_path, mode, says):
    d = _shared(tmp_path / "d", mode)
    with pytest.raises(RequestError) as e:
        private_dir(d, "data_dir")
    assert e.value.field == "data_dir" and says in str(e.value) and f"chmod 700 {d}" in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_a_dir_another_user_owns_is_refused_with_the_keys_planted_there(tmp_path):
    d = _foreign(tmp_path / "longtake")
    (d / "link_key").write_text("chosen-by-someone-else\n")  # what a local attacker would plant
    with pytest.raises(RequestError) as e:
        private_dir(d, "data_dir")
    assert e.value.field == "data_dir" and f"belongs to uid {NOBODY}" in str(e.value)
    with pytest.raises(RequestError, match="belongs to uid"):  # the secret is never read from there
        load_or_create_secret(d / "link_key")
    with pytest.raises(RequestError, match="farm_dir: .*belongs to uid"):
        farm.open_store(d)


def test_the_default_data_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("LONGTAKE_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir() == str(tmp_path / ".local" / "share" / "longtake" / "serve")
    from longtake.cli import options

    assert options.default_data_dir is default_data_dir  # one definition


def test_every_entry_point_refuses_a_shared_dir(tmp_path, capsys):
    shared = _shared(tmp_path / "shared")
    assert main(["keys", "add", "alice", "--data-dir", str(shared)]) == 2
    err = capsys.readouterr().err
    assert "data_dir" in err and "chmod 700" in err and not (shared / "api_keys.json").exists()
    assert main(["serve", "--data-dir", str(shared)]) == 2  # refused before Ray starts
    assert capsys.readouterr().err.startswith(f"longtake serve: error: data_dir: got {str(shared)!r}")
    (shared / "farm.db").touch()
    assert main(["farm", "monitor", "--farm-dir", str(shared)]) == 2
    assert capsys.readouterr().err.startswith(f"longtake farm monitor: error: farm_dir: got {str(shared)!r}")
    (shared / "farm.db").unlink()
    assert not (shared / "api_token").exists() and not (shared / "monitor_key").exists()
    with pytest.raises(RequestError, match="farm_dir"):
        farm.open_store(shared)
    assert not (shared / "farm.db").exists()
    with pytest.raises(RequestError, match="farm_dir"):
        build_monitor(shared)
    from longtake.serve.deployments import app_builder

    with pytest.raises(RequestError, match="data_dir"):
        app_builder({"data_dir": str(shared)})
    assert not (shared / "api_token").exists()


def test_serve_creates_its_files_owner_only(tmp_path):
    store = FileStore(tmp_path / "data")
    kept = _keep(store, owner_of("a"))
    folder = store.root / kept["id"]
    for path in (store.root, folder, folder / "content", folder / "meta.json"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


# -- the Host check (#23) ----------------------------------------------------------------------------------

def test_served_hosts():
    assert served_hosts() == ("localhost", "127.0.0.1", "::1")
    assert served_hosts("0.0.0.0") == served_hosts("::") == served_hosts()  # every interface names no host
    assert served_hosts("10.0.0.5", ["Render.Example.COM.", "[fd00::1]:80"])[3:] == (
        "10.0.0.5", "render.example.com", "fd00::1")
    with pytest.raises(RequestError, match="allowed_host"):
        served_hosts(None, ["a b"])


@pytest.fixture
def farm_dir(tmp_path):
    d = tmp_path / "farm"
    farm.open_store(d)
    return d


@pytest.mark.parametrize("host", ["127.0.0.1:8100", "localhost", "LOCALHOST:1", "[::1]:8100"])
def test_the_monitor_answers_its_loopback_names(farm_dir, host):
    r = TestClient(build_monitor(farm_dir)).get("/api/jobs", headers={"Host": host})
    assert r.status_code == 200 and r.json()["jobs"] == []


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8100", "127.0.0.1.evil.example", "10.0.0.5"])
def test_a_rebound_name_gets_421(farm_dir, host):
    """A page at http://evil.example:8100/ whose name now resolves to 127.0.0.1 sends Host evil.example."""
    client = TestClient(build_monitor(farm_dir))
    for path in ("/api/jobs", "/", "/static/farm.js", "/no/such/route"):
        r = client.get(path, headers={"Host": host})
        assert r.status_code == 421, (path, r.status_code)
        assert r.json() == {"detail": {"field": "Host", "error": r.json()["detail"]["error"]}}
        assert f"Host: got {host!r}" in r.json()["detail"]["error"] and "--allowed-host" in r.json()["detail"]["error"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"  # still with the security headers


def test_allowed_hosts_widen_the_check(farm_dir):
    named = TestClient(build_monitor(farm_dir, hosts=served_hosts("10.0.0.5", ["farm.example"])))
    assert named.get("/api/jobs", headers={"Host": "farm.example:8100"}).status_code == 200
    assert named.get("/api/jobs", headers={"Host": "10.0.0.5:8100"}).status_code == 200
    assert named.get("/api/jobs", headers={"Host": "other.example"}).status_code == 421
    anyone = TestClient(build_monitor(farm_dir, hosts=served_hosts(None, ["*"])))
    assert anyone.get("/api/jobs", headers={"Host": "other.example"}).status_code == 200


# -- messages keep routes, hide paths (#6) -----------------------------------------------------------------

def test_public_message_keeps_routes_and_hides_paths():
    text = "image: got '/etc/passwd', expected the id of a file you uploaded (POST /v1/files)"
    assert public_message(text) == "image: got '<path>', expected the id of a file you uploaded (POST /v1/files)"
    assert public_message("deleted on request (DELETE /v1/videos/0123456789abcdef)").endswith(
        "(DELETE /v1/videos/0123456789abcdef)")
    assert public_message("see /v1/videos/{job_id}/links, /healthz and /openapi.json.") == (
        "see /v1/videos/{job_id}/links, /healthz and /openapi.json.")
    for path in ("/etc/passwd", "/tmp/x/y.mp4", "~/keys", "./here", "/home/u/.local/share/longtake/serve/link_key",
                 "~/v1/x", "/v1/files/../../etc/passwd", "/v1x/y"):
        assert public_message(f"no file {path} here") == "no file <path> here", path


# -- upload quotas and the sweep of partial uploads (#18) --------------------------------------------------

def _keep(store: FileStore, owner: str, admit=None, colour: str = "red") -> dict:
    with store.receive() as incoming:
        Image.new("RGB", (32, 24), colour).save(incoming.path, format="PNG")
        return store.add(incoming.path, owner, "a.png", admit)


class OverQuota(Exception):
    pass


def test_add_admits_a_file_by_what_its_owner_would_hold(tmp_path):
    store, alice, bob = FileStore(tmp_path), owner_of("alice"), owner_of("bob")
    seen = []

    def at_most_two(files, total):
        seen.append((files, total))
        if files > 2:
            raise OverQuota(f"{files} files")

    first, second = _keep(store, alice, at_most_two), _keep(store, alice, at_most_two, "blue")
    with pytest.raises(OverQuota):
        _keep(store, alice, at_most_two, "green")
    assert store.usage(alice) == (2, first["bytes"] + second["bytes"])
    assert [n for n, _ in seen] == [1, 2, 3] and seen[1][1] < seen[2][1]  # what it would hold with the new one
    assert _keep(store, bob, at_most_two)  # another owner's quota is its own
    assert not any((store.root / ".incoming").iterdir())  # the refused file is gone


def test_upload_stops_at_the_room_left_in_the_quota(tmp_path):
    from longtake.serve.uploads import TooLarge, Upload

    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n" + b"x" * 500 +
            b"\r\n--b--\r\n")
    fits = Upload(tmp_path / "a", b"b", limit=1000, quota=(600, "over quota"))
    fits.write(body)
    fits.close()
    assert (tmp_path / "a").stat().st_size == 500
    over = Upload(tmp_path / "b", b"b", limit=1000, quota=(400, "over quota"))
    with pytest.raises(TooLarge, match="over quota"):
        over.write(body)


def test_the_sweep_removes_what_no_live_upload_holds(tmp_path):
    store = FileStore(tmp_path)
    live = store.receive()  # an upload still being received
    live.path.write_bytes(b"half of it")
    dead = store.incoming()  # what a server that died mid-upload left
    dead.write_bytes(b"half of another")
    staged = store.root / ".incoming" / "0123abcd.d"  # a server that died while moving a file into place
    staged.mkdir()
    (staged / "content").write_bytes(b"whole")
    now = time.time()
    assert store.sweep_incoming(now=now) == []  # nothing is touched within the grace time
    assert sorted(store.sweep_incoming(now=now + 3600)) == sorted([dead.name, staged.name])
    assert live.path.read_bytes() == b"half of it" and not dead.exists() and not staged.exists()
    live.close()
    assert not live.path.exists()


# -- event streams: one poll per job, a cap per key (#21) --------------------------------------------------

async def _read(stream) -> list[str]:
    return [text async for text in stream if not text.startswith(":")]


def test_streams_of_a_job_share_one_poll():
    reads = {"a": 0, "b": 0}

    async def fetch(job_id):  # the manager: each read of a job moves it on a step, done after 3
        reads[job_id] += 1
        step = reads[job_id] - 1
        return {"status": "done" if step == 3 else "running", "progress": {"step": step}, "error": None}

    async def run():
        events = JobEvents(fetch, lambda status: status == "done", max_streams=10, poll_s=0.02)
        streams = [events.stream(f"c{i % 2}", "a") for i in range(6)] + [events.stream("c0", "b")]
        got = await asyncio.gather(*(_read(s) for s in streams))
        return events, got

    events, got = asyncio.run(run())
    assert reads == {"a": 4, "b": 4}  # one read per step of each job, not one per stream
    assert events.polls == 8 and not events.watches and not events.open
    for events_of_one in got:  # every stream: progress in order (steps 0..3 as read), then the end
        steps = [int(e.split('"step": ')[1].split("}")[0]) for e in events_of_one if e.startswith("event: progress")]
        assert steps == sorted(set(steps)) and steps[-1] == 3, events_of_one
        assert events_of_one[-1].startswith("event: end") and '"status": "done"' in events_of_one[-1]


def test_a_key_has_at_most_max_streams_open():
    async def fetch(job_id):
        return {"status": "running", "progress": {}, "error": None}

    async def run():
        events = JobEvents(fetch, lambda status: False, max_streams=2, poll_s=0.001)
        first, second = events.stream("alice", "a"), events.stream("alice", "a")
        with pytest.raises(TooManyStreams, match="max_event_streams"):
            events.stream("alice", "b")
        other = events.stream("bob", "a")  # another key has its own
        assert await first.__anext__() == await other.__anext__()
        await first.aclose()  # a stream that ends frees its place
        third = events.stream("alice", "a")
        del second  # one dropped before it was ever started frees its place too
        gc.collect()
        fourth = events.stream("alice", "a")
        for s in (third, fourth, other):
            await s.aclose()
        return events

    events = asyncio.run(run())
    assert events.open == {} and events.watches == {}


# -- playlists are not videos (#24) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def playlists(tmp_path_factory):
    """A real MP4, an HLS playlist and an ffconcat file that both name it (or its MPEG-TS copy)."""
    d = tmp_path_factory.mktemp("playlists")
    with VideoWriter(d / "clip.mp4", 64, 64, 8) as w:
        w.write(np.full((16, 64, 64, 3), 128, np.uint8))
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(d / "clip.mp4"), "-c", "copy", "-f", "mpegts",
                    str(d / "clip.ts")], check=True)
    (d / "list.m3u8").write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n"
                                 f"{d / 'clip.ts'}\n#EXT-X-ENDLIST\n")
    (d / "list.ffconcat").write_text("ffconcat version 1.0\nfile 'clip.mp4'\n")
    return d


def test_a_playlist_is_not_read_as_a_video(playlists):
    assert probe_media("video", str(playlists / "clip.mp4"))["kind"] == "video"  # what they point at is fine
    assert probe_media("video", str(playlists / "clip.ts"))["kind"] == "video"
    for name in ("list.m3u8", "list.ffconcat"):
        path = str(playlists / name)
        with pytest.raises(RequestError) as e:
            probe_media("extend", path)
        assert e.value.field == "extend" and "playlists" in str(e.value)
        with pytest.raises(RequestError, match="^video: .*playlists"):
            open_video("video", path, 8, 64, 64)


def test_an_uploaded_playlist_is_refused(playlists, tmp_path):
    store = FileStore(tmp_path)
    for name in ("list.m3u8", "list.ffconcat"):
        with store.receive() as incoming:
            incoming.path.write_bytes((playlists / name).read_bytes())
            (incoming.path.parent / "clip.mp4").write_bytes((playlists / "clip.mp4").read_bytes())  # beside it
            with pytest.raises(RequestError) as e:
                store.add(incoming.path, owner_of("a"), name)
        assert e.value.field == "file"
    assert store.all() == []
