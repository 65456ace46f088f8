"""A DICOMweb client for building a pre-training dataset from a hospital's PACS.

Hospitals keep their images in a PACS, and most PACS (Orthanc, dcm4chee, Google/Azure/AWS health imaging, ...)
speak DICOMweb: QIDO-RS to search, WADO-RS to retrieve. ``tools/prepare.py scans URL --out OUT`` lists the
series with :func:`list_series` and fetches each with :func:`retrieve_series`; the DICOM-to-volume conversion
lives elsewhere (data/dicom.py). The HTTP and multipart work is the ``dicomweb-client`` package's; this module
adds what a dataset tool needs on top:

- credentials from the URL (``http://user:pass@host/dicom-web``), or ``DICOMWEB_USERNAME`` /
  ``DICOMWEB_PASSWORD`` (HTTP basic), or ``DICOMWEB_TOKEN`` (bearer), without ever writing them out;
- every series search result, paged with offset/limit whatever the server's page limit, in a stable order;
- instances asked for in Explicit VR Little Endian, so that pydicom decodes every pixel whatever the PACS
  stores (Orthanc transcodes), else in whatever the server has; retries with backoff on connection errors and
  5xx answers;
- errors as :class:`DicomwebError` naming the URL (credentials removed), the series (by :func:`series_key`) and
  what was expected.

Privacy: messages name a series only by :func:`series_key`, a hash of its UID; no UID, patient field or
credential appears in a message or a log line of this module (dicomweb-client's own INFO/DEBUG lines, which
carry UIDs, are turned off below; urllib3's DEBUG lines carry URL paths, so keep its logger above DEBUG).
"""

from __future__ import annotations

import hashlib
import http
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.datadict import tag_for_keyword

from .common import DatasetError

__all__ = ["DicomwebError", "RemoteSeries", "parse_query", "connect", "list_series", "retrieve_series", "series_key"]

logger = logging.getLogger(__name__)
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its INFO/DEBUG lines name study and series UIDs

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
UNCOMPRESSED = (("application/dicom", EXPLICIT_VR_LITTLE_ENDIAN),)
AS_STORED = (("application/dicom", "*"),)
# A server that cannot send the asked transfer syntax says 406 (the standard), 400/415, or 500/501 (Orthanc:
# "Cannot transcode image"); then the series is asked for as stored.
REFUSED_TRANSFER_SYNTAX = {400, 406, 415, 500, 501}
SERIES_FIELDS = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"]
TAG = {"study": "0020000D", "series": "0020000E", "modality": "00080060", "instances": "00201209"}
RETRY_BACKOFF_S = 1.0  # waits 1, 2, 4, ... s between attempts
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
CREDENTIALS_HELP = (
    "give a user and password in the URL (http://user:password@host/...) or in DICOMWEB_USERNAME and "
    "DICOMWEB_PASSWORD, or a bearer token in DICOMWEB_TOKEN"
)


class DicomwebError(DatasetError):
    """A DICOMweb server could not be reached, refused us, or answered something unexpected; the message names
    the URL (without credentials), the series (by :func:`series_key`) and what was expected."""


@dataclass(frozen=True)
class RemoteSeries:
    """One series on the server, as the QIDO-RS series search describes it."""

    study_uid: str
    series_uid: str
    modality: str
    num_instances: int | None


def series_key(series_uid: str) -> str:
    """The name of a series in messages, logs and file names: the first 16 hex digits of the SHA-256 of its UID."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def parse_query(query: str | Sequence[str] | Mapping[str, object] | None) -> dict[str, str]:
    """QIDO-RS search filters from ``"Modality=CT"``, ``["Modality=CT", "StudyDate=2024*"]`` or
    ``{"Modality": "CT"}``. Keys are DICOM keywords (``BodyPartExamined``) or tags (``00080060``).

    Raises:
        ValueError: an item is not KEY=VALUE, its key is not a DICOM keyword or tag, or a key is given twice.
    """
    if query is None:
        return {}
    if isinstance(query, Mapping):
        pairs = [(str(k), str(v), f"{k}={v}") for k, v in query.items()]
    else:
        items = [query] if isinstance(query, str) else list(query)
        pairs = [(*_split(item), item) for item in items]
    filters: dict[str, str] = {}
    for key, value, item in pairs:
        if not key or not value:
            raise ValueError(f"query {item!r}: expected KEY=VALUE, e.g. Modality=CT or StudyDate=20240101-20241231")
        if not all(
            tag_for_keyword(part) is not None or re.fullmatch(r"[0-9A-Fa-f]{8}", part) for part in key.split(".")
        ):
            raise ValueError(
                f"query {item!r}: {key!r} is not a DICOM keyword or tag; expected KEY=VALUE with a keyword such as "
                "Modality, StudyDate or BodyPartExamined (as spelled in the DICOM standard), or a tag like 00080060"
            )
        if key in filters:
            raise ValueError(f"query {item!r}: {key} is given twice; expected each key once")
        filters[key] = value
    return filters


def _split(item: object) -> tuple[str, str]:
    key, sep, value = str(item).partition("=")
    return (key.strip(), value.strip()) if sep else ("", "")


class _Session(requests.Session):
    """A session whose every request has ``timeout`` (older dicomweb-client versions set none)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):
        kwargs["timeout"] = self.timeout
        return super().request(method, url, **kwargs)


def public_url(url: str) -> str:
    """``url`` without its user and password: everything between ``//`` and the last ``@`` goes (an unencoded
    ``/`` or ``@`` in a password must not leave half of it in the host or path)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)?.*@", r"\1", url, flags=re.DOTALL) if "@" in url else url


def connect(url: str, timeout: float = 60) -> DICOMwebClient:
    """A client for the DICOMweb root ``url`` (e.g. ``http://pacs:8042/dicom-web``); contacts nobody yet.

    Credentials, first found wins: ``user:password@`` in the URL (percent-encode ``/ @ :`` in them), the
    environment's ``DICOMWEB_USERNAME`` and ``DICOMWEB_PASSWORD`` (HTTP basic), ``DICOMWEB_TOKEN`` (bearer).
    ``timeout`` (s) applies to connecting and to each wait for data.

    Raises:
        DicomwebError: not an http(s) URL, or only half of the username/password pair in the environment.
    """
    shown = public_url(url).rstrip("/")
    parts = urlsplit(url)
    try:
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        ok = ok and "@" not in parts.path and not parts.query and not parts.fragment  # so `shown` is the URL itself
    except ValueError:  # a port that is no number; its text may hold a piece of an unencoded password
        ok = False
    if not ok:
        raise DicomwebError(
            f"{shown}: not a DICOMweb URL; expected http(s)://host[:port]/path (no ?query), e.g. "
            "http://pacs:8042/dicom-web "
            "(percent-encode / @ : in a user name or password, or pass them in DICOMWEB_USERNAME/DICOMWEB_PASSWORD)"
        )
    session = _Session(timeout)
    user, password = os.environ.get("DICOMWEB_USERNAME"), os.environ.get("DICOMWEB_PASSWORD")
    if parts.username is not None:
        session.auth = (unquote(parts.username), unquote(parts.password or ""))
    elif user or password:
        if not (user and password):
            missing = "DICOMWEB_PASSWORD" if user else "DICOMWEB_USERNAME"
            raise DicomwebError(f"{shown}: {missing} is not set; expected DICOMWEB_USERNAME and DICOMWEB_PASSWORD both")
        session.auth = (user, password)
    elif os.environ.get("DICOMWEB_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['DICOMWEB_TOKEN']}"
    try:
        client = DICOMwebClient(shown, session=session, permissive_uid=True)  # real PACS hold non-conformant UIDs
    except ValueError as e:  # dicomweb-client's own URL check; its text holds the URL, without credentials
        raise DicomwebError(f"{shown}: not a DICOMweb URL ({e})") from None
    client.set_http_retry_params(retry=False)  # retrieve_series retries, visibly
    return client


def _where(client: DICOMwebClient) -> str:
    return public_url(str(client.base_url))


def _auth(client: DICOMwebClient) -> str:
    session = getattr(client, "_session", None)
    if isinstance(getattr(session, "auth", None), tuple):
        return f"the user {session.auth[0]!r} and its password"
    if session is not None and str(session.headers.get("Authorization", "")).startswith("Bearer "):
        return "the bearer token"
    return "a request without credentials"


def _problem(error: Exception, client: DICOMwebClient) -> str:
    """What went wrong, in words that name no UID and no credential (requests' own texts hold the full URL)."""
    response = getattr(error, "response", None)
    if isinstance(error, requests.HTTPError) and response is not None:
        code = response.status_code
        text = f"HTTP {code} {_phrase(code)}"
        if code in (401, 403):
            return f"{text}: the server refused {_auth(client)}; {CREDENTIALS_HELP}"
        return text
    if isinstance(error, requests.Timeout):
        return f"no answer in time ({_cause(error)})"
    if isinstance(error, requests.RequestException):
        return f"cannot connect ({_cause(error)})"
    return f"its answer could not be read ({type(error).__name__})"


def _phrase(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return ""


def _cause(error: BaseException) -> str:
    """The operating system's words for a connection failure (``Connection refused``, ``Name or service not
    known``), found down the chain of exceptions; else the exception's type."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, requests.RequestException) and current.strerror:
            return current.strerror
        reason = getattr(current, "reason", None)
        current = current.__cause__ or current.__context__ or (reason if isinstance(reason, BaseException) else None)
    return type(error).__name__


def list_series(
    client: DICOMwebClient, query: str | Sequence[str] | Mapping[str, object] | None = None, page_size: int = 500
) -> list[RemoteSeries]:
    """Every series matching ``query`` (see :func:`parse_query`), sorted by study and series UID.

    Pages through the QIDO-RS series search with offset/limit until a page is empty, so a server that caps its
    pages below ``page_size`` loses nothing; one that ignores the offset ends the paging when a page brings
    nothing new. No retries: this is the first contact, where errors are the configuration's.

    Raises:
        ValueError: a malformed query.
        DicomwebError: the server cannot be reached, refuses the credentials, is no DICOMweb endpoint (e.g. a
            404 on /series), or answers something other than DICOM JSON.
    """
    filters = parse_query(query)
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    found: dict[str, RemoteSeries] = {}
    offset = 0
    while True:
        page = [_remote_series(item, client) for item in _search(client, filters, offset, page_size)]
        new = {s.series_uid: s for s in page if s.series_uid not in found}
        if not new:
            break
        found.update(new)
        offset += len(page)
    return sorted(found.values(), key=lambda s: (s.study_uid, s.series_uid))


def _search(client: DICOMwebClient, filters: dict[str, str], offset: int, limit: int) -> list:
    where = _where(client)
    try:
        page = client.search_for_series(search_filters=filters, fields=SERIES_FIELDS, offset=offset, limit=limit)
    except requests.JSONDecodeError:
        page = None
    except requests.RequestException as e:
        if isinstance(e, requests.HTTPError) and _status(e) in (404, 405):
            raise DicomwebError(
                f"{where}: not a DICOMweb endpoint (the series search {where}/series answered "
                f"{_problem(e, client)}); expected the DICOMweb root of the PACS, e.g. http://host:8042/dicom-web "
                "for Orthanc"
            ) from None
        raise DicomwebError(f"{where}: the QIDO-RS series search failed: {_problem(e, client)}") from None
    if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
        raise DicomwebError(
            f"{where}: the series search ({where}/series) did not answer with DICOM JSON; expected the DICOMweb "
            "root of the PACS, e.g. http://host:8042/dicom-web for Orthanc"
        )
    return page


def _remote_series(item: dict, client: DICOMwebClient) -> RemoteSeries:
    def value(tag: str):
        entry = item.get(tag)
        values = entry.get("Value") if isinstance(entry, dict) else None
        return values[0] if values else None

    study, series = value(TAG["study"]), value(TAG["series"])
    if not (isinstance(study, str) and isinstance(series, str)):
        raise DicomwebError(
            f"{_where(client)}: a series search result has no StudyInstanceUID or SeriesInstanceUID; expected "
            "both in every QIDO-RS series result"
        )
    try:
        count = int(value(TAG["instances"]))
    except (TypeError, ValueError):
        count = None
    return RemoteSeries(study, series, str(value(TAG["modality"]) or ""), count)


def retrieve_series(client: DICOMwebClient, series: RemoteSeries, retries: int = 3) -> list[pydicom.Dataset]:
    """Every instance of ``series`` (WADO-RS, in memory), sorted by InstanceNumber then SOPInstanceUID.

    Asks for Explicit VR Little Endian (uncompressed: pydicom decodes every pixel); a server that refuses to
    transcode (406, 400, 415, 500, 501) is asked again for the instances as stored. Connection errors, timeouts
    and 5xx answers are retried ``retries`` times, waiting 1, 2, 4, ... s.

    Raises:
        DicomwebError: naming the series by :func:`series_key` and the URL: not found, credentials refused, the
            server still failing after the retries, an unreadable answer, or fewer instances than the search said.
    """
    what = f"series {series_key(series.series_uid)} of {_where(client)}"
    for attempt in range(retries + 1):
        try:
            instances = _retrieve(client, series)
            break
        except requests.RequestException as e:
            if not _transient(e) or attempt == retries:
                raise _retrieve_error(e, client, what, attempt + 1) from None
            wait = RETRY_BACKOFF_S * 2**attempt
            logger.warning("%s: %s; retrying in %.0f s", what, _problem(e, client), wait)
            time.sleep(wait)
        except Exception as e:  # a part that is not DICOM, a malformed multipart answer, ...
            raise DicomwebError(
                f"{what}: {_problem(e, client)}; expected multipart/related DICOM instances (WADO-RS)"
            ) from None
    if series.num_instances is not None and len(instances) < series.num_instances:
        raise DicomwebError(
            f"{what}: received {len(instances)} instances, the series search announced {series.num_instances}"
        )
    return sorted(instances, key=_instance_order)


def _retrieve(client: DICOMwebClient, series: RemoteSeries) -> list[pydicom.Dataset]:
    try:
        return client.retrieve_series(series.study_uid, series.series_uid, media_types=UNCOMPRESSED)
    except requests.HTTPError as e:
        if _status(e) not in REFUSED_TRANSFER_SYNTAX:
            raise
    return client.retrieve_series(series.study_uid, series.series_uid, media_types=AS_STORED)


def _instance_order(ds: pydicom.Dataset) -> tuple[int, str]:
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number, str(ds.get("SOPInstanceUID", ""))


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return None if response is None else response.status_code


def _transient(error: requests.RequestException) -> bool:
    return isinstance(error, TRANSIENT) or (_status(error) or 0) >= 500


def _retrieve_error(error: Exception, client: DICOMwebClient, what: str, attempts: int) -> DicomwebError:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    hint = "; expected the series that the search found (deleted since?)" if _status(error) == 404 else ""
    return DicomwebError(f"{what}: the WADO-RS retrieve failed{tries}: {_problem(error, client)}{hint}")
