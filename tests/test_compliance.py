"""Compliance (#17): the visible label, the AIGC metadata read back by ffprobe, the integrity code (what it
covers, another installation's key, files of the previous scheme), `verify` (the watermark anywhere in a long
file), and determinism on the frames as generated."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longtake import watermark
from longtake.tools import bench_watermark
from longtake import label as labels
from longtake.actors.pool import InProcessPool
from longtake.actors.worker import WorkerSpec
from longtake.cluster.engine import prepare, run
from longtake.cli import main
from longtake.provenance import (AIGC_FIELDS, C2PA_FILES, INTEGRITY_SCHEME, LEGACY_SCHEME, SOURCE_TYPE, Provenance,
                                 key_id, legacy_integrity_code, load_key, read_tags, stream_sha256, verify)
from longtake.request import RequestError
from longtake.serve.manager import JobManager, Limits
from longtake.video import VideoWriter, ffmpeg_exe, read_frames
from longtake.watermark import payload_of


def ffprobe() -> str:
    found = shutil.which("ffprobe") or str(Path(sys.executable).parent / "ffprobe")
    assert Path(found).is_file(), "ffprobe is missing: `make test` unpacks one into the venv"
    return found


def boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of the MP4 boxes in data[start:end]."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = int.from_bytes(data[start:start + 4], "big"), data[start + 4:start + 8].decode("latin-1")
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[start + 8:start + 16], "big"), 16
        size = size or end - start
        yield kind, start + header, start + size
        start += size


def child(data: bytes, parent: tuple[int, int], kind: str, skip: int = 0) -> tuple[int, int]:
    for k, s, e in boxes(data, parent[0] + skip, parent[1]):
        if k == kind:
            return s, e
    raise AssertionError(f"no {kind} box")


@pytest.fixture(scope="module")
def pool(tiny_model):
    p = InProcessPool(WorkerSpec(tiny_model))
    yield p
    p.shutdown()


def _request(model, out, **kw) -> dict:
    return {"prompt": "a red ball", "seconds": 3, "fps": 8, "steps": 2, "window": 8, "overlap": 2, "seed": 3,
            "model": model, "out": str(out), **kw}


@pytest.mark.parametrize("width, height", [(32, 32), (64, 64), (96, 64), (256, 256), (512, 288), (1280, 720)])
@pytest.mark.parametrize("text", [labels.DEFAULT_TEXT, "AI生成"])
def test_the_label_fits_the_frame_and_is_at_least_5_percent_of_its_short_side_high(width, height, text):
    if width < 50 and text != labels.DEFAULT_TEXT:
        with pytest.raises(labels.LabelError, match="label_text"):  # a text of one's own is never shortened
            labels.layout(text, labels.DEFAULT_POSITION, width, height)
        return
    lay = labels.layout(text, labels.DEFAULT_POSITION, width, height)
    assert lay.text == (labels.SHORT_TEXT if width < 52 else text)
    x0, y0, x1, y1 = lay.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert lay.mask.shape[0] >= labels.MIN_HEIGHT_SHARE * min(width, height)
    assert lay.font == ("3x5" if width < 104 and text == labels.DEFAULT_TEXT else "unifont")
    frame = np.full((1, height, width, 3), 128, np.uint8)
    lay.draw(frame)
    assert labels.detect(frame[0], lay)["present"]
    assert not labels.detect(np.full((height, width, 3), 128, np.uint8), lay)["present"]


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 512])
def test_the_watermark_survives_reencoding_resizing_and_excerpts_unseen(tmp_path, size):
    """The bench's trial (tests/test_watermark.py has the crops, padding, brightness and contrast)."""
    attacks = ("none", "crf28", "half", "excerpt_2s", "half_excerpt_2s")
    row = bench_watermark.trial(bench_watermark._longtake_embed, bench_watermark._longtake_read, size, tmp_path, "t",
                                watermark.read, unmarked=1 if size == 256 else 0, attacks=attacks)
    assert row["psnr_db"] >= 40, row
    assert tuple(row["bit_accuracy"]) == attacks and set(bench_watermark.ATTACKS) > set(attacks)
    assert min(row["bit_accuracy"].values()) == 1.0 and all(row["found"].values()), row
    assert not row["false_positive"] and row.get("unmarked", {"found": 0})["found"] == 0
    plain = bench_watermark.make_clip(size, seconds=2)  # never marked: the CRC says so
    assert not watermark.read(plain)["found"]


def test_a_label_that_cannot_be_drawn_is_refused_before_any_work(tiny_model, tmp_path):
    with pytest.raises(RequestError) as e:  # 40 characters at 3x5 need 160 px
        prepare(_request(tiny_model, tmp_path / "x.mp4", label_text="x" * 40))
    assert e.value.field == "label_text" and "64x64" in str(e.value)
    with pytest.raises(RequestError) as e:
        prepare(_request(tiny_model, tmp_path / "x.mp4", label_text="🎬 AI"))  # outside the BMP: no glyph
    assert e.value.field == "label_text" and "🎬" in str(e.value)
    assert prepare(_request(tiny_model, tmp_path / "x.mp4", label="none", label_text="x" * 40)).label is None
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_default_render_is_labelled_tagged_and_verifies(tiny_model, pool, tmp_path):
    key_dir = tmp_path / "keys"
    out = tmp_path / "clip.mp4"
    result = run(prepare(_request(tiny_model, out)), pool, progress=False,
                 provenance=Provenance.local(key_dir, producer="studio-7"))
    # ffprobe, a third-party reader, finds the GB 45438 object and the standard tags
    probe = json.loads(subprocess.run([ffprobe(), "-v", "error", "-show_format", "-of", "json", str(out)],
                                      capture_output=True, text=True, check=True).stdout)
    tags = probe["format"]["tags"]
    aigc = json.loads(tags["AIGC"])
    assert tuple(aigc) == AIGC_FIELDS
    assert aigc["Label"] == "1" and aigc["ContentProducer"] == "studio-7" and aigc["ProduceID"] == result.produce_id
    assert len(aigc["ReservedCode1"]) == 64
    assert tags["frames_sha256"] == result.frames_sha256 and tags["delivered_sha256"] == result.delivered_sha256
    assert tags["generator"].startswith("longtake ") and tags["seed"] == "3" and tags["label"] == "start"
    # ... in moov/udta/meta, as an mdta key named AIGC
    data = out.read_bytes()
    moov = child(data, (0, len(data)), "moov")
    meta = child(data, child(data, moov, "udta"), "meta")
    keys = child(data, meta, "keys", skip=4)  # meta is a full box: version and flags first
    assert b"mdtaAIGC" in data[keys[0]:keys[1]]
    # the label is on the first 2 seconds (16 frames at 8 fps) and nowhere after
    frames = read_frames(out)
    lay = labels.layout(labels.DEFAULT_TEXT, labels.DEFAULT_POSITION, 64, 64)
    present = [labels.detect(f, lay)["present"] for f in frames]
    assert result.labelled_frames == math.ceil(2 * 8) == 16
    assert present == [True] * 16 + [False] * (len(frames) - 16)
    # verify: marked, intact with the key, unchecked without it; the watermark names the job
    report = verify(out, load_key(key_dir, create=False))
    assert report["marked"] and report["integrity"] == "intact" and report["visible_label"]["present"]
    assert report["watermark"]["found"] and report["watermark"]["payload"] == f"{payload_of(result.produce_id):08x}"
    assert tags["watermark"] == f"{watermark.NAME} {report['watermark']['payload']}"
    assert verify(out)["integrity"] == "unchecked (no key)"
    assert verify(out, b"\0" * 32)["integrity"] == "unchecked (signed with another key)"  # never "altered"
    assert tags["integrity_scheme"] == INTEGRITY_SCHEME and tags["key_id"] == key_id(load_key(key_dir))


@pytest.mark.slow
def test_frames_sha256_is_the_frames_as_generated_whatever_the_label_and_watermark(tiny_model, pool, tmp_path):
    results = {mode: run(prepare(_request(tiny_model, tmp_path / f"{mode}.mp4", label=mode)), pool, progress=False,
                         provenance=Provenance.local(tmp_path))
               for mode in ("start", "always", "none")}
    assert len({r.frames_sha256 for r in results.values()}) == 1
    delivered = {r.delivered_sha256 for r in results.values()}  # watermarked, then labelled on 0, 16 or 24 frames
    assert len(delivered) == 3 and results["none"].frames_sha256 not in delivered
    assert [r.labelled_frames for r in results.values()] == [16, 24, 0]
    unlabelled = verify(tmp_path / "none.mp4", load_key(tmp_path))
    assert unlabelled["tags"]["label"] == "none" and not unlabelled["visible_label"]["present"]
    assert unlabelled["marked"] and unlabelled["integrity"] == "intact"  # the metadata still says AI


def _retagged(src: Path, dst: Path, **tags: str) -> Path:
    """`src` remuxed (the packets copied as they are) with `tags` set; an empty value removes the tag."""
    options = [x for k, v in tags.items() for x in ("-metadata", f"{k}={v}")]
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(src), "-c", "copy", "-movflags", "use_metadata_tags",
                    "-map_metadata", "0", *options, str(dst)], check=True)
    return dst


def _aigc_with(path: Path, **fields: str) -> str:
    aigc = json.loads(read_tags(path)["AIGC"])
    return json.dumps({**aigc, **fields}, separators=(",", ":"))


@pytest.mark.slow
def test_verify_catches_a_reencoded_file_and_any_changed_or_removed_tag(tiny_model, pool, tmp_path):
    out = tmp_path / "clip.mp4"
    run(prepare(_request(tiny_model, out)), pool, progress=False, provenance=Provenance.local(tmp_path))
    key = load_key(tmp_path)
    signed = read_tags(out)["signed_tags"].split(",")
    assert {"AIGC", "generator", "model", "seed", "request_sha256", "frames_sha256", "delivered_sha256", "label",
            "label_text", "label_position", "label_frames", "watermark", "comment", "integrity_scheme", "key_id",
            "signed_tags"} == set(signed)
    # a remux that changes nothing stays intact (the tags survive the round trip); an added tag is not covered
    same = _retagged(out, tmp_path / "same.mp4", note="added later")
    report = verify(same, key)
    assert report["integrity"] == "intact" and report["unsigned_tags"] == ["note"], report
    assert report["integrity_covers"] == [*signed, "video stream"]
    reencoded = tmp_path / "reencoded.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(out), "-c:v", "libx264", "-crf", "28",
                    "-movflags", "use_metadata_tags", "-map_metadata", "0", str(reencoded)], check=True)
    changed = {  # each: one tag rewritten, or removed, the video stream untouched
        "Label 2": {"AIGC": _aigc_with(out, Label="2")},
        "ContentProducer": {"AIGC": _aigc_with(out, ContentProducer="someone-else")},
        "ProduceID": {"AIGC": _aigc_with(out, ProduceID="another-job")},
        "label none": {"label": "none"},
        "model": {"model": "another-model"},
        "frames_sha256": {"frames_sha256": "0" * 64},
        "comment removed": {"comment": ""},
        "model dropped from signed_tags": {"model": "x", "signed_tags": ",".join(t for t in signed if t != "model")},
    }
    for name, tags in changed.items():
        path = _retagged(out, tmp_path / f"{name.replace(' ', '-')}.mp4", **tags)
        assert stream_sha256(path) == stream_sha256(out)  # a remux keeps the packets: only the tags changed
        report = verify(path, key)
        assert report["aigc"] is not None and report["integrity"] == "altered", (name, report["integrity"])
    report = verify(reencoded, key)
    assert report["integrity"] == "altered"
    assert report["watermark"]["payload"] == f"{payload_of(report['aigc']['ProduceID']):08x}"  # CRF 28, 64x64


@pytest.mark.slow
def test_a_file_signed_with_another_key_is_unchecked_never_altered(tiny_model, pool, tmp_path, capsys):
    out = tmp_path / "farm-output.mp4"
    run(prepare(_request(tiny_model, out)), pool, progress=False, provenance=Provenance.local(tmp_path / "farm"))
    other = load_key(tmp_path / "home")  # e.g. the CLI's key, checking a farm's output without --farm-dir
    report = verify(out, other)
    assert report["integrity"] == "unchecked (signed with another key)" and report["marked"]
    note = report["integrity_note"]
    assert report["key_id"] in note and key_id(other) in note and "altered" not in note
    for place in ("DATA_DIR/provenance.key", "--data-dir", "FARM/provenance.key", "--farm-dir",
                  "$LONGTAKE_HOME/provenance.key", "--key-file"):
        assert place in note, place
    assert main(["verify", str(out), "--key-file", str(tmp_path / "home" / "provenance.key")]) == 0
    printed = capsys.readouterr().out
    assert "integrity: unchecked (signed with another key)" in printed and "altered" not in printed
    assert "--farm-dir FARM" in printed
    assert main(["verify", str(out), "--farm-dir", str(tmp_path / "farm")]) == 0  # the right key
    assert f"integrity: intact ({INTEGRITY_SCHEME}: covers AIGC," in capsys.readouterr().out
    # the same key, a changed tag: altered
    retagged = _retagged(out, tmp_path / "retagged.mp4", model="another-model")
    assert verify(retagged, load_key(tmp_path / "farm"))["integrity"] == "altered"
    assert verify(retagged, other)["integrity"] == "unchecked (signed with another key)"


@pytest.mark.slow
def test_a_file_of_the_previous_scheme_verifies_under_its_own_rule(tiny_model, pool, tmp_path):
    out = tmp_path / "clip.mp4"
    run(prepare(_request(tiny_model, out)), pool, progress=False, provenance=Provenance.local(tmp_path))
    key, tags = load_key(tmp_path), read_tags(out)
    aigc = json.loads(tags["AIGC"])
    code = legacy_integrity_code(key, aigc["ProduceID"], tags["frames_sha256"], stream_sha256(out))
    old = _retagged(out, tmp_path / "old.mp4", AIGC=_aigc_with(out, ReservedCode1=code), integrity_scheme="",
                    key_id="", signed_tags="")  # as longtake wrote files before INTEGRITY_SCHEME
    report = verify(old, key)
    assert report["integrity"] == "intact" and report["integrity_scheme"] == LEGACY_SCHEME
    assert report["integrity_covers"] == ["AIGC.ProduceID", "frames_sha256", "video stream"]
    assert "model" in report["unsigned_tags"] and "label" in report["unsigned_tags"]
    changed = verify(_retagged(old, tmp_path / "old-changed.mp4", frames_sha256="0" * 64), key)
    assert changed["integrity"] == "mismatch" and "another key" in changed["integrity_note"]
    assert verify(old, b"\1" * 32)["integrity"] == "mismatch"  # no key id: it cannot tell, so it says neither


def test_verify_finds_the_watermark_after_minutes_of_unmarked_frames(tmp_path):
    """An extend-like file: 250 frames passed through unmarked (over 30 s at 8 fps), then 30 new, marked."""
    frames = bench_watermark.make_clip(64, seconds=35, seed=4)  # 280 frames
    payload = payload_of("job-long")
    frames[250:] = watermark.Embedder(payload, 64, 64).mark(frames[250:])
    with VideoWriter(tmp_path / "long.mp4", 64, 64, 8) as w:
        w.write(frames)
    report = verify(tmp_path / "long.mp4")
    mark = report["watermark"]
    assert mark["found"] and mark["payload"] == f"{payload:08x}" and report["marked"], mark
    assert mark["frames"] == 64 and 1 <= mark["voters"] < 64  # spread over the file; the last frames voted


@pytest.mark.slow
def test_verify_cli_exit_codes(tiny_model, pool, tmp_path, cli_cases):
    marked, plain = tmp_path / "marked.mp4", tmp_path / "plain.mp4"
    run(prepare(_request(tiny_model, marked)), pool, progress=False, provenance=Provenance.local(tmp_path))
    with VideoWriter(plain, 64, 64, 8) as w:  # an MP4 longtake did not make
        w.write(np.full((8, 64, 64, 3), 90, np.uint8))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    cases = cli_cases([["verify", str(marked), "--key-file", str(tmp_path / "provenance.key")],
                       ["verify", str(plain)], ["verify", str(tmp_path / "junk.mp4")],
                       ["verify", str(tmp_path / "missing.mp4")]], tmp_path)
    assert [c["rc"] for c in cases[:4]] == [0, 1, 2, 2], cases
    assert "error: file" in cases[3]["err"] and "Traceback" not in cases[2]["err"] + cases[3]["err"]


def test_serve_refuses_an_unlabelled_request_unless_allowed(tmp_path, tiny_model):
    body = {"prompt": "a red ball", "seconds": 2, "fps": 8, "steps": 2, "window": 8, "overlap": 2, "label": "none"}
    strict = JobManager(tmp_path / "a", None, tiny_model, Limits(max_running=0))
    allowing = JobManager(tmp_path / "b", None, tiny_model, Limits(max_running=0, allow_unlabelled=True))
    try:
        with pytest.raises(RequestError) as e:
            strict.submit(body)
        assert e.value.field == "label" and "--allow-unlabelled" in str(e.value)
        assert strict.store.count() == 0
        record, created = allowing.submit(body)
        assert created and record["status"] == "queued" and record["request"]["label"] == "none"
    finally:
        strict.close()
        allowing.close()


def _c2pa_credentials(directory: Path) -> None:
    """A test CA and a signing certificate it issued (c2pa-rs refuses a self-signed signer), written as
    provenance.C2PA_FILES."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "longtake test")])

    def usage(sign_certs: bool):
        return x509.KeyUsage(digital_signature=not sign_certs, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=sign_certs,
                             crl_sign=sign_certs, encipher_only=False, decipher_only=False)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(True), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("longtake test signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = (directory / name for name in C2PA_FILES)
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


@pytest.mark.slow
def test_a_configured_certificate_signs_a_c2pa_manifest_beside_the_rest(tiny_model, pool, tmp_path):
    _c2pa_credentials(tmp_path)
    out = tmp_path / "signed.mp4"
    result = run(prepare(_request(tiny_model, out)), pool, progress=False, provenance=Provenance.local(tmp_path))
    report = verify(out, load_key(tmp_path))
    c2pa = report["c2pa"]
    assert c2pa["present"] and c2pa["claim_generator"] == ["longtake"]
    assert c2pa["signer"]["common_name"] == "longtake test signer"
    assert [(a["action"], a["digitalSourceType"]) for a in c2pa["actions"]] == [("c2pa.created", SOURCE_TYPE)]
    assert c2pa["validation"] == ["signingCredential.untrusted"]  # our test CA is in no trust list; nothing else
    # the manifest sits beside the video stream: the metadata, its integrity code and the watermark all hold
    assert report["integrity"] == "intact" and report["watermark"]["found"]
    tags = json.loads(subprocess.run([ffprobe(), "-v", "error", "-show_format", "-of", "json", str(out)],
                                     capture_output=True, text=True, check=True).stdout)["format"]["tags"]
    assert json.loads(tags["AIGC"])["ProduceID"] == result.produce_id
    (tmp_path / C2PA_FILES[1]).unlink()  # a certificate without its key: refused before any work
    with pytest.raises(ValueError, match="without .*c2pa-key.pem"):
        Provenance.local(tmp_path)
