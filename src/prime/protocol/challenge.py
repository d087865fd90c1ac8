"""Challenge link (validator → miner): the four messages of the proof-of-compute challenge.

    POST /challenge              ChallengeRequest  → CommitmentAnswer
    POST /challenge/{id}/open    OpenRequest       → OpeningAnswer (OpenedRow per row)

Each message is declared once, here, as a msgspec Struct; its annotations *are* its
validation: decoding with ``decoder(Type)`` refuses wrong types (a bool is never an int),
numbers out of range, strings and lists past their limits, unknown fields and malformed
JSON with ``msgspec.ValidationError`` / ``msgspec.DecodeError``. What depends on the
challenge in hand (row indices below its n, a row of exactly 4·n bytes, the answer naming
the challenge that was sent) is checked by the side that holds it (prime.challenge).

Hashes and rows are ``bytes`` (standard base64 in JSON, decoded by msgspec in C): an opened
row is its n values as little-endian IEEE float32; its Merkle leaf hashes them in the
challenge's dtype (2 bytes a value for float16 and bfloat16, prime.challenge.merkle).

Imports nothing from prime.roles (nor from prime.challenge: this is the bottom layer).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar, get_args

import msgspec

from prime.protocol.codec import Message  # immutable, unknown fields refused

# ------------------------------------------------------------------ limits
MAX_N: Final = 32768
MAX_REPEAT: Final = 4096
# A challenge of ``parts`` parts is that many independent products, one per claimed GPU
# (docs/protocol.md "Parts"); their rows are committed in one tree, part p's row i at p·n + i.
MAX_PARTS: Final = 16
MAX_ROWS: Final = MAX_N * MAX_PARTS
# K = n·repeat: the validator's cost per checked entry is O(K) (2**21: ~2·132·2**21 element
# hashes per challenge); |C| ~ 0.6·sqrt(K) stays far below float16's max (docs/protocol.md,
# "Tolerance" and "Sizing").
MAX_INNER: Final = 1 << 21
SEED_LIMIT: Final = 1 << 64
MAX_OPEN_ROWS: Final = 4096
HASH_BYTES: Final = 32
MAX_PATH: Final = (MAX_ROWS - 1).bit_length()  # 19: the depth of a tree over MAX_ROWS rows
ROW_ITEMSIZE: Final = 4  # float32 on the wire, whatever the challenge dtype
MAX_ROW_BYTES: Final = ROW_ITEMSIZE * MAX_N
MAX_ELAPSED_S: Final = 86400.0
MAX_BACKEND_LENGTH: Final = 64
# Python's "$" also matches before a final "\n"; the lookahead refuses that (and reads the
# same in an ECMA regex, so the JSON schema stays usable by other tools).
ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$(?!\n)"

ChallengeId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=ID_PATTERN,
                                          description="1-64 of [A-Za-z0-9_-]")]
# msgspec bounds must fit an int64, so the upper end (< 2**64) is checked in __post_init__.
Seed = Annotated[int, msgspec.Meta(ge=0, description="0 <= seed < 2**64",
                                   extra_json_schema={"maximum": SEED_LIMIT - 1})]
Size = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
Repeat = Annotated[int, msgspec.Meta(ge=1, le=MAX_REPEAT)]
Parts = Annotated[int, msgspec.Meta(ge=1, le=MAX_PARTS)]
Dtype = Literal["float32", "float16", "bfloat16"]
DTYPES: Final[tuple[str, ...]] = get_args(Dtype)
RowIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_ROWS - 1)]
Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES,
                                     description="32-byte sha256 digest, base64")]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_ELAPSED_S)]
Backend = Annotated[str, msgspec.Meta(max_length=MAX_BACKEND_LENGTH)]
RowBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_ROW_BYTES,
                                         description="n little-endian float32 values, base64")]
Path = Annotated[list[Hash], msgspec.Meta(max_length=MAX_PATH)]
RowList = Annotated[list[RowIndex], msgspec.Meta(min_length=1, max_length=MAX_OPEN_ROWS)]


# ------------------------------------------------------------------ POST /challenge
class ChallengeRequest(Message, frozen=True, forbid_unknown_fields=True):
    """The challenge (what the validator sends): compute C_p = A_p·B_p for every part p < parts,
    A_p n × K, B_p K × n, K = n·repeat; one part per claimed GPU, all computed at once."""

    id: ChallengeId
    seed: Seed
    n: Size
    dtype: Dtype = "float32"
    repeat: Repeat = 1
    parts: Parts = 1

    def __post_init__(self) -> None:
        if self.seed >= SEED_LIMIT:
            raise ValueError("seed must be below 2**64")
        if self.n * self.repeat > MAX_INNER:
            raise ValueError(f"n * repeat must not exceed {MAX_INNER}")

    @property
    def inner(self) -> int:
        """K, the inner dimension of the product."""
        return self.n * self.repeat

    @property
    def rows(self) -> int:
        """Rows committed: every part's n rows, part p's row i at index p·n + i."""
        return self.parts * self.n

    @property
    def flops(self) -> int:
        return 2 * self.parts * self.n * self.n * self.inner


# GPU identity in a commitment: the NVML UUIDs of exactly the GPUs that computed C (in the
# miner's --gpu order) and the driver's identity. Canonical form only: "GPU-" or "MIG-" and
# a lowercase 8-4-4-4-12 hex UUID (what NVML prints), so two spellings of one card cannot
# pass for two cards.
MAX_GPUS: Final = 64  # GPUs one commitment may name; 64 of them keep it under COMMITMENT_ANSWER_LIMIT
GPU_UUID_LENGTH: Final = 40
GPU_UUID_PATTERN: Final = r"^(GPU|MIG)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$(?!\n)"
MAX_DRIVER_VERSION_LENGTH: Final = 32
DRIVER_VERSION_PATTERN: Final = r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$(?!\n)"  # "550.54.15"
CUDA_VERSION_PATTERN: Final = r"^[0-9]{1,3}\.[0-9]{1,3}$(?!\n)"  # "12.4"

GpuUuid = Annotated[str, msgspec.Meta(min_length=GPU_UUID_LENGTH, max_length=GPU_UUID_LENGTH,
                                      pattern=GPU_UUID_PATTERN,
                                      description="GPU-/MIG- and a lowercase 8-4-4-4-12 hex UUID, as NVML reports it")]
GpuUuids = Annotated[list[GpuUuid], msgspec.Meta(max_length=MAX_GPUS)]


class DriverIdentity(Message, frozen=True, forbid_unknown_fields=True):
    """The NVIDIA driver that ran the GPUs: its version (NVML) and the CUDA version it supports."""

    version: Annotated[str, msgspec.Meta(max_length=MAX_DRIVER_VERSION_LENGTH, pattern=DRIVER_VERSION_PATTERN)]
    cuda: Annotated[str, msgspec.Meta(max_length=7, pattern=CUDA_VERSION_PATTERN)] | None = None


class CommitmentAnswer(Message, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The miner's answer once C is computed: the Merkle root over C's rows.

    ``gpu_uuids`` and ``driver`` name the GPUs that computed C; a CPU node (and a miner
    from before they existed) sends neither, and omit_defaults leaves them out of its JSON.
    """

    id: ChallengeId
    root: Hash
    n: Size
    dtype: Dtype
    repeat: Repeat
    elapsed_s: Seconds
    backend: Backend
    parts: Parts = 1
    gpu_uuids: GpuUuids = msgspec.field(default_factory=list)
    driver: DriverIdentity | None = None

    def __post_init__(self) -> None:
        if len(set(self.gpu_uuids)) != len(self.gpu_uuids):
            raise ValueError("gpu_uuids must be distinct")


# ------------------------------------------------------------------ POST /challenge/{id}/open
class OpenRequest(Message, frozen=True, forbid_unknown_fields=True):
    """The rows the validator wants opened: distinct indices (each below the challenge's parts·n)."""

    rows: RowList

    def __post_init__(self) -> None:
        if len(set(self.rows)) != len(self.rows):
            raise ValueError("row indices must be distinct")


class OpenedRow(Message, frozen=True, forbid_unknown_fields=True):
    """One opened row: its values (exactly 4·n bytes: float32 whatever the dtype) and its Merkle
    path, leaf level first."""

    index: RowIndex
    values: RowBytes
    path: Path


class OpeningAnswer(Message, frozen=True, forbid_unknown_fields=True):
    """The miner's answer to an open request: one OpenedRow per requested row."""

    id: ChallengeId
    rows: Annotated[list[OpenedRow], msgspec.Meta(max_length=MAX_OPEN_ROWS)]


MESSAGES: Final = (ChallengeRequest, CommitmentAnswer, OpenRequest, OpenedRow, OpeningAnswer)

# ------------------------------------------------------------------ one decoder per message
M = TypeVar("M", bound=Message)

_DECODERS: Final[dict[type[Message], msgspec.json.Decoder[Message]]] = {
    t: msgspec.json.Decoder(t) for t in MESSAGES}


def decoder(message: type[M]) -> msgspec.json.Decoder[M]:
    """The one JSON decoder of that message type (made once at import)."""
    return _DECODERS[message]  # type: ignore[return-value]


def decode(message: type[M], raw: bytes | bytearray | memoryview | str) -> M:
    """``raw`` JSON as a ``message``; raises msgspec.DecodeError (ValidationError included)."""
    return decoder(message).decode(raw)


encode = msgspec.json.encode  # a message as compact JSON bytes (bytes fields as base64)


def opening_answer_limit(rows: int, n: int) -> int:
    """Most bytes a well-formed OpeningAnswer for ``rows`` rows of length ``n`` can take.

    A validator reads no further: base64 of each row and its path, plus generous room for
    keys, punctuation and the id. Anything longer is a malformed answer, however it ends.
    """
    def b64(size: int) -> int:
        return 4 * ((size + 2) // 3)

    per_row = b64(ROW_ITEMSIZE * n) + MAX_PATH * (b64(HASH_BYTES) + 8) + 256
    return 1024 + rows * per_row


COMMITMENT_ANSWER_LIMIT: Final = 4096  # bytes; a real one is about 200


# ------------------------------------------------------------------ POST /challenge/{id}/verdict
MAX_REASON_LENGTH: Final = 4096


class VerdictNote(Message, frozen=True):
    """What a validator tells the node after writing its verdict on chain (best effort; the
    miner shows the reason when it stops for a rejection)."""

    approved: bool
    reason: Annotated[str, msgspec.Meta(max_length=MAX_REASON_LENGTH)]
    report_hash: Annotated[str, msgspec.Meta(pattern=r"^0x[0-9a-fA-F]{64}$(?!\n)", description="0x + 64 hex digits")]

