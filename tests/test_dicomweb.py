"""The DICOMweb client (data/dicomweb.py) against a real Orthanc PACS, and against a stub server for what a real
one does not do on demand (503s, a refused transfer syntax, capped pages, a web page instead of DICOM JSON).

The Orthanc tests skip, with the reason, where Orthanc is not installed (tests/orthanc.py); the others run
everywhere. One Orthanc serves the whole module: a study of two CT series (one stored RLE-compressed) and a
study with an MR series and a CT series stored as JPEG 2000, which Orthanc cannot transcode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc import OrthancServer, free_port, orthanc_available
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from selfmedmae_components.data import dicomweb
from selfmedmae_components.data.common import DatasetError
from selfmedmae_components.data.dicomweb import (
    DicomwebError,
    RemoteSeries,
    connect,
    list_series,
    parse_query,
    retrieve_series,
    series_key,
)

PATIENTS = {"P-0001": "Doe^Jane", "P-0002": "Roe^Richard"}
WRONG_PASSWORD = "Wr0ng-pa55-should-not-show"


# ---- synthetic DICOM --------------------------------------------------------------------------------------------


def _dataset(sop_class: str, study: str, series: str, modality: str, number: int, patient: str, date: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient, PATIENTS[patient], "19700101"
    ds.StudyDate = ds.SeriesDate = date
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, number
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.5 * number], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    return ds


def write_series(folder: Path, study: str, modality: str, slices: int, patient: str, date: str, rle: bool = False):
    """Files of one series of 16x16 slices; (series UID, {SOPInstanceUID: pixels}, paths)."""
    series, pixels, paths = generate_uid(), {}, []
    rng = np.random.default_rng(int(series_key(series), 16))
    for number in range(1, slices + 1):
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        ds = _dataset(sop_class, study, series, modality, number, patient, date)
        if modality == "CT":
            ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, 0, 1
            array = rng.integers(-1024, 3000, (16, 16), dtype=np.int16)
        else:
            ds.PixelRepresentation = 0
            array = rng.integers(0, 4000, (16, 16), dtype=np.uint16)
        ds.PixelData = array.tobytes()
        if rle:
            ds.compress(RLELossless)
        path = folder / f"{series_key(series)}_{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        pixels[ds.SOPInstanceUID], paths = array, paths + [path]
    return series, pixels, paths


def write_jpeg2000(folder: Path, study: str) -> tuple[str, bytes, Path]:
    """One CT instance stored as JPEG 2000 (a stand-in codestream: Orthanc stores it, but cannot transcode it)."""
    series = generate_uid()
    ds = _dataset(CTImageStorage, study, series, "CT", 1, "P-0002", "20240301")
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelRepresentation = 1
    fragment = b"\xff\x4f\xff\x51" + bytes(range(60))
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    path = folder / "jpeg2000.dcm"
    ds.save_as(path, enforce_file_format=True)
    return series, fragment, path


# ---- the PACS ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """(server, what was uploaded): {"ct_a", "ct_rle", "mr", "j2k"} -> (study, series, pixels or fragment)."""
    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    files = tmp_path_factory.mktemp("dicom")
    study1, study2 = generate_uid(), generate_uid()
    ct_a, ct_a_pixels, paths = write_series(files, study1, "CT", 3, "P-0001", "20240115")
    ct_rle, ct_rle_pixels, rle_paths = write_series(files, study1, "CT", 2, "P-0001", "20240115", rle=True)
    mr, mr_pixels, mr_paths = write_series(files, study2, "MR", 2, "P-0002", "20240301")
    j2k, fragment, j2k_path = write_jpeg2000(files, study2)
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(paths + rle_paths + mr_paths + [j2k_path])
        yield (
            server,
            {
                "ct_a": (study1, ct_a, ct_a_pixels),
                "ct_rle": (study1, ct_rle, ct_rle_pixels),
                "mr": (study2, mr, mr_pixels),
                "j2k": (study2, j2k, fragment),
            },
        )


def error_text(call, *args, **kwargs) -> str:
    """The message of the DicomwebError that ``call`` raises, checked for things that must never show."""
    with pytest.raises(DicomwebError) as info:
        call(*args, **kwargs)
    text = str(info.value)
    assert isinstance(info.value, DatasetError)
    assert "Pa55" not in text and "pa55" not in text, text  # neither the test user's password nor a wrong one
    assert "1.2.826.0.1.3680043" not in text and not any(name in text for name in PATIENTS.values()), text
    return text


def test_server_starts_quickly(pacs):
    server, _ = pacs
    assert server.startup_s < 10, server.log()
    assert "DicomWeb" in server.log() or "dicom-web" in server.log().lower()


def test_list_series_finds_every_series_with_its_modality_and_size(pacs):
    server, uploaded = pacs
    found = list_series(connect(server.url_with_credentials()))
    expected = [
        RemoteSeries(study, series, "MR" if name == "mr" else "CT", 1 if name == "j2k" else len(content))
        for name, (study, series, content) in uploaded.items()
    ]
    assert found == sorted(expected, key=lambda s: (s.study_uid, s.series_uid))


@pytest.mark.parametrize(
    "query, names",
    [
        ("Modality=CT", {"ct_a", "ct_rle", "j2k"}),
        (["Modality=MR"], {"mr"}),
        ({"Modality": "CT", "StudyDate": "20240101-20240131"}, {"ct_a", "ct_rle"}),
        ("PatientID=P-0002", {"mr", "j2k"}),
        ("Modality=PT", set()),
    ],
)
def test_list_series_filters(pacs, query, names):
    server, uploaded = pacs
    found = {s.series_uid for s in list_series(connect(server.url_with_credentials()), query)}
    assert found == {uploaded[name][1] for name in names}


def test_list_series_pages_through_everything(pacs):
    server, _ = pacs
    client = connect(server.url_with_credentials())
    assert list_series(client, page_size=1) == list_series(client, page_size=2) == list_series(client)


@pytest.mark.parametrize("name", ["ct_a", "ct_rle", "mr"])
def test_retrieve_series_gives_uncompressed_instances_with_the_uploaded_pixels(pacs, name):
    """The RLE-compressed series too: Orthanc transcodes it to the Explicit VR Little Endian we ask for."""
    server, uploaded = pacs
    study, series, pixels = uploaded[name]
    remote = RemoteSeries(study, series, "", len(pixels))
    instances = retrieve_series(connect(server.url_with_credentials()), remote)
    assert [int(ds.InstanceNumber) for ds in instances] == list(range(1, len(pixels) + 1))
    for ds in instances:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        np.testing.assert_array_equal(ds.pixel_array, pixels[ds.SOPInstanceUID])
        assert ds.PatientName in PATIENTS.values()


def test_retrieve_series_takes_what_the_server_has_when_it_cannot_transcode(pacs):
    """Orthanc answers 500 "Cannot transcode image" for JPEG 2000; the instance then comes as stored."""
    server, uploaded = pacs
    study, series, fragment = uploaded["j2k"]
    (ds,) = retrieve_series(connect(server.url_with_credentials()), RemoteSeries(study, series, "CT", 1))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert fragment in ds.PixelData


def test_credentials_from_the_environment(pacs, monkeypatch):
    server, uploaded = pacs
    user, password = server.credentials
    monkeypatch.setenv("DICOMWEB_USERNAME", user)
    monkeypatch.setenv("DICOMWEB_PASSWORD", password)
    assert len(list_series(connect(server.url))) == len(uploaded)
    monkeypatch.setenv("DICOMWEB_PASSWORD", WRONG_PASSWORD)
    text = error_text(list_series, connect(server.url))
    assert "HTTP 401" in text and f"user {user!r}" in text and server.url in text


def test_url_credentials_win_over_the_environment(pacs, monkeypatch):
    server, uploaded = pacs
    monkeypatch.setenv("DICOMWEB_USERNAME", "someone-else")
    monkeypatch.setenv("DICOMWEB_PASSWORD", WRONG_PASSWORD)
    assert len(list_series(connect(server.url_with_credentials()))) == len(uploaded)


def test_wrong_or_missing_credentials_are_named_without_the_password(pacs, monkeypatch):
    server, uploaded = pacs
    user, _ = server.credentials
    text = error_text(list_series, connect(server.url_with_credentials(password=WRONG_PASSWORD)))
    assert text.startswith(f"{server.url}: ") and "HTTP 401 Unauthorized" in text and f"user {user!r}" in text
    assert "DICOMWEB_USERNAME" in text and "@127.0.0.1" not in text
    for var in ("DICOMWEB_USERNAME", "DICOMWEB_PASSWORD", "DICOMWEB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    text = error_text(list_series, connect(server.url))
    assert "HTTP 401" in text and "without credentials" in text
    study, series, pixels = uploaded["ct_a"]
    text = error_text(retrieve_series, connect(server.url), RemoteSeries(study, series, "CT", 3))
    assert f"series {series_key(series)} of {server.url}" in text and "HTTP 401" in text


def test_a_bearer_token_is_sent_and_not_shown(pacs, monkeypatch):
    """Orthanc knows no tokens (without its authorization plugin): it refuses one, and the message says which."""
    server, _ = pacs
    monkeypatch.setenv("DICOMWEB_TOKEN", "tok-Pa55-secret")
    text = error_text(list_series, connect(server.url))
    assert "HTTP 401" in text and "bearer token" in text and "tok-" not in text


def test_a_path_that_is_no_dicomweb_root(pacs):
    server, _ = pacs
    url = server.url_with_credentials().replace("/dicom-web", "/not-dicom-web")
    text = error_text(list_series, connect(url))
    shown = server.url.replace("/dicom-web", "/not-dicom-web")
    assert (
        text.startswith(f"{shown}: not a DICOMweb endpoint") and "HTTP 404" in text and "expected the DICOMweb" in text
    )


def test_a_closed_port(monkeypatch):
    monkeypatch.setattr(dicomweb, "RETRY_BACKOFF_S", 0.0)
    url = f"http://someone:Pa55word@127.0.0.1:{free_port()}/dicom-web"
    text = error_text(list_series, connect(url, timeout=5))
    assert text.startswith(f"http://127.0.0.1:{url.rsplit(':', 1)[1]}: ") and "Connection refused" in text
    remote = RemoteSeries("1.2.3", "1.2.3.4", "CT", None)
    text = error_text(retrieve_series, connect(url, timeout=5), remote, retries=2)
    assert f"series {series_key('1.2.3.4')}" in text and "after 3 attempts" in text and "Connection refused" in text


def test_retrieve_series_that_is_gone_or_short(pacs):
    server, uploaded = pacs
    client = connect(server.url_with_credentials())
    study, series, pixels = uploaded["ct_a"]
    gone = generate_uid()
    text = error_text(retrieve_series, client, RemoteSeries(study, gone, "CT", 3))
    assert f"series {series_key(gone)} of {server.url}" in text and "HTTP 404" in text
    text = error_text(retrieve_series, client, RemoteSeries(study, series, "CT", 5))
    assert "received 3 instances, the series search announced 5" in text


def test_no_uid_in_the_logs(pacs, caplog):
    server, uploaded = pacs
    study, series, _ = uploaded["ct_rle"]
    with caplog.at_level(logging.DEBUG):
        client = connect(server.url_with_credentials())
        list_series(client)
        retrieve_series(client, RemoteSeries(study, series, "CT", 2))
    ours = [
        r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("selfmedmae_components", "dicomweb_client")
    ]
    assert not any(study in line or series in line for line in ours), ours


# ---- without a server -------------------------------------------------------------------------------------------


def test_parse_query():
    assert parse_query(None) == {} and parse_query([]) == {}
    assert parse_query("Modality=CT") == {"Modality": "CT"}
    assert parse_query(["Modality=CT", "StudyDate=2024*"]) == {"Modality": "CT", "StudyDate": "2024*"}
    assert parse_query({"Modality": "MR", "00180015": "HEAD"}) == {"Modality": "MR", "00180015": "HEAD"}
    assert parse_query(" SeriesDescription = T1 axial ") == {"SeriesDescription": "T1 axial"}
    for bad, words in [
        ("Modality", "expected KEY=VALUE"),
        ("=CT", "expected KEY=VALUE"),
        ("Modality=", "expected KEY=VALUE"),
        ("modality=CT", "'modality' is not a DICOM keyword"),
        (["Modality=CT", "Modality=MR"], "given twice"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_query(bad)


def test_series_key():
    assert series_key("1.2.3") == hashlib.sha256(b"1.2.3").hexdigest()[:16]
    assert len(series_key("1.2.840.1")) == 16 and series_key("1.2.3") != series_key("1.2.4")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:pass@host:8042/dicom-web", "http://host:8042/dicom-web"),
        ("https://u:p%2Fq@pacs.example/dicomweb/", "https://pacs.example/dicomweb/"),
        ("http://user:Pa55/w@rd@host/x", "http://host/x"),  # an unencoded / and @: all of it goes
        ("http://host:8042/dicom-web", "http://host:8042/dicom-web"),
    ],
)
def test_public_url(url, shown):
    assert dicomweb.public_url(url) == shown


@pytest.mark.parametrize(
    "url", ["ftp://host/dicom-web", "host:8042/dicom-web", "http:///x", "http://u:Pa55/x@h:1/y", "http://h/x?a=b@c"]
)
def test_connect_refuses_what_is_no_http_url(url):
    assert "not a DICOMweb URL; expected http(s)://host[:port]/path" in error_text(connect, url)


def test_connect_wants_both_halves_of_the_environment_pair(monkeypatch):
    monkeypatch.setenv("DICOMWEB_USERNAME", "someone")
    monkeypatch.delenv("DICOMWEB_PASSWORD", raising=False)
    assert "DICOMWEB_PASSWORD is not set" in error_text(connect, "http://host/dicom-web")


class Stub(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that answers every GET with ``answer(path, headers) -> (status, headers, body)``
    and records (path, headers)."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        super().__init__(("127.0.0.1", 0), _StubHandler)
        threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True).start()  # shutdown() waits a poll

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def __exit__(self, *exc):
        self.shutdown()
        super().__exit__(*exc)


class _StubHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append((self.path, dict(self.headers)))
        status, headers, body = self.server.answer(self.path, self.headers)
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _qido(series_uids: list[str]) -> bytes:
    return json.dumps(
        [
            {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": [uid]}}
            for uid in series_uids
        ]
    ).encode()


def _offset(path: str) -> int:
    return int(next((p.split("=")[1] for p in path.split("?")[1].split("&") if p.startswith("offset=")), 0))


def test_list_series_with_a_server_that_caps_its_pages_or_ignores_the_offset():
    uids = [f"1.2.3.{i}" for i in range(7)]
    capped = lambda path, headers: (200, {"Content-Type": "application/dicom+json"}, _qido(uids[_offset(path) :][:2]))
    with Stub(capped) as server:
        assert [s.series_uid for s in list_series(connect(server.url), page_size=500)] == sorted(uids)
    ignores_offset = lambda path, headers: (200, {"Content-Type": "application/dicom+json"}, _qido(uids))
    with Stub(ignores_offset) as server:
        assert len(list_series(connect(server.url))) == 7 and len(server.requests) == 2


def test_a_web_page_is_no_dicomweb_answer():
    page = lambda path, headers: (200, {"Content-Type": "text/html"}, b"<html><body>Welcome</body></html>")
    with Stub(page) as server:
        text = error_text(list_series, connect(server.url))
    assert "did not answer with DICOM JSON" in text and "expected the DICOMweb root" in text


def test_the_token_goes_in_a_bearer_header(monkeypatch):
    monkeypatch.setenv("DICOMWEB_TOKEN", "tok-Pa55")
    with Stub(lambda path, headers: (200, {"Content-Type": "application/dicom+json"}, b"[]")) as server:
        assert list_series(connect(server.url)) == []
    assert server.requests[0][1]["Authorization"] == "Bearer tok-Pa55"


def test_retrieve_series_retries_5xx_then_says_what_failed(monkeypatch, caplog):
    monkeypatch.setattr(dicomweb, "RETRY_BACKOFF_S", 0.0)
    series = RemoteSeries("1.2.3", "1.2.3.4", "CT", 1)
    with Stub(lambda path, headers: (503, {}, b"busy")) as server:
        text = error_text(retrieve_series, connect(server.url), series, retries=2)
    assert len(server.requests) == 3
    assert text == f"series {series_key('1.2.3.4')} of {server.url}: the WADO-RS retrieve failed after 3 attempts: " + (
        "HTTP 503 Service Unavailable"
    )
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def _multipart(*parts: bytes) -> tuple[dict, bytes]:
    body = b"".join(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--\r\n"
    return {"Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ'}, body


def test_retrieve_series_falls_back_when_the_transfer_syntax_is_refused(tmp_path):
    """A server that says 406 to Explicit VR Little Endian is asked for the instances as stored."""
    _, pixels, paths = write_series(tmp_path, generate_uid(), "CT", 2, "P-0001", "20240115", rle=True)
    headers, body = _multipart(*(p.read_bytes() for p in paths))

    def answer(path, request_headers):
        return (406, {}, b"") if "1.2.840.10008.1.2.1" in request_headers["Accept"] else (200, headers, body)

    with Stub(answer) as server:
        instances = retrieve_series(connect(server.url), RemoteSeries("1.2.3", "1.2.3.4", "CT", 2))
    assert [r[1]["Accept"] for r in server.requests] == [
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1',
        'multipart/related; type="application/dicom"; transfer-syntax=*',
    ]
    assert [ds.file_meta.TransferSyntaxUID for ds in instances] == [RLELossless, RLELossless]
    for ds in instances:
        np.testing.assert_array_equal(ds.pixel_array, pixels[ds.SOPInstanceUID])


def test_an_answer_that_is_not_dicom():
    with Stub(lambda path, headers: (200, {"Content-Type": "text/html"}, b"<html>login</html>")) as server:
        text = error_text(retrieve_series, connect(server.url), RemoteSeries("1.2.3", "1.2.3.4", "CT", 1))
    assert f"series {series_key('1.2.3.4')}" in text and "expected multipart/related DICOM instances" in text


def test_pydicom_reads_what_the_tests_write(tmp_path):
    """The synthetic files themselves: the RLE one really is compressed, and decodes to its pixels."""
    _, pixels, paths = write_series(tmp_path, generate_uid(), "CT", 1, "P-0001", "20240115", rle=True)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(ds.pixel_array, pixels[ds.SOPInstanceUID])
