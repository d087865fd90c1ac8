"""Master -> miner ``POST /invite``: the invite body, the signed acknowledgement, the digest.

Declared once, used by both ends (``roles/master/invites.py`` sends and checks, ``roles/miner/
invite.py`` checks and answers). The master signs ``invite_digest(chain_id, registry, run_id,
node, expiry)`` (EIP-191 over the 32 bytes; the registry's ``joinRun`` checks the same digest);
the miner answers with its node key's EIP-191 signature over ``ack_text(...)``, which proves the
invite reached the node's key and not something else at that URL.

The structs are the validation (``prime.protocol.codec.Message``): ``InviteBody.from_json(data)``
and ``InviteAnswer.from_json(data)`` (raw bytes or parsed JSON) raise ``ValidationError`` naming
the field; ``to_json()`` gives the wire form. Constructing a struct directly checks nothing.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from prime.protocol.codec import Message

ACK_PROTOCOL = "prime-invite-ack-v1"
MAX_URL_LENGTH = 2048
# The registry takes expiry as uint64; msgspec bounds fit in an int64, which no unix time reaches.
MAX_EXPIRY = 2**63 - 1
MAX_RUN_ID = 2**63 - 1
SIGNATURE_PATTERN = r"^0x[0-9a-fA-F]{130}$"
ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
TX_HASH_PATTERN = r"^0x[0-9a-fA-F]{64}$"

RunId = Annotated[int, msgspec.Meta(ge=0, le=MAX_RUN_ID, description="The run on chain.")]
Expiry = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXPIRY, description="Unix time (s) the invite expires at.")]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL_LENGTH)]
Signature = Annotated[str, msgspec.Meta(pattern=SIGNATURE_PATTERN, description="0x + 65 bytes r||s||v in hex.")]
Address = Annotated[str, msgspec.Meta(pattern=ADDRESS_PATTERN)]
TxHash = Annotated[str, msgspec.Meta(pattern=TX_HASH_PATTERN)]


class InviteBody(Message, frozen=True, forbid_unknown_fields=True):
    """Body of POST /invite: the master's signature over ``invite_digest`` for this node."""

    run_id: RunId
    master_url: Url
    expiry: Expiry
    signature: Signature


class InviteAnswer(Message, frozen=True, forbid_unknown_fields=True):
    """The miner's 200 answer: who joined (``tx_hash`` None: it was a member already) and its ack."""

    node: Address
    run_id: RunId
    master_url: Url
    tx_hash: TxHash | None
    ack: Signature


def invite_digest(chain_id: int, registry: str, run_id: int, node: str, expiry: int) -> bytes:
    """keccak256(abi.encode(chainId, registry, runId, node, expiry)): what a master signs to invite a node."""
    return keccak(
        abi_encode(
            ["uint256", "address", "uint256", "address", "uint64"],
            [chain_id, to_checksum_address(registry), run_id, to_checksum_address(node), expiry],
        )
    )


def ack_text(chain_id: int, registry: str, run_id: int, node: str, expiry: int) -> str:
    """What the node signs to acknowledge an invite (addresses in checksum form)."""
    return f"{ACK_PROTOCOL}\n{chain_id}\n{to_checksum_address(registry)}\n{run_id}\n{to_checksum_address(node)}\n{expiry}"
