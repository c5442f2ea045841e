"""A tiny MaxMind DB writer, for tests: it builds a small country database (GeoLite2-Country
layout) so a test needs no downloaded file.

    write_mmdb(path, {"203.0.113.0/24": {"country": {"iso_code": "DE", "names": {"en": "Germany"}}}})

Format: MaxMind DB File Format Specification 2.0, https://maxmind.github.io/MaxMind-DB/ --
a binary search tree over the address bits (record size 32 here: a node is two big-endian
uint32 records, left for bit 0, right for bit 1), 16 zero bytes, the data section, then
b"\\xab\\xcd\\xefMaxMind.com" and the metadata map. A record below node_count is a node,
node_count itself means "no data", and a larger one points to data at
(record - node_count - 16) in the data section. In an IPv6 database the IPv4 networks sit
at ::a.b.c.d (96 zero bits, then the 32 IPv4 bits), where readers look for IPv4 addresses;
the ::ffff:0:0/96 and 2002::/16 aliases MaxMind's own databases add are left out.

Ints are written as uint32 (uint64 when larger); UInt16/UInt32/UInt64 force a type, as
the metadata needs (libmaxminddb checks the types). Records are written once each, no pointers.
"""

from __future__ import annotations

import ipaddress
import struct
import time

METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
RECORD_SIZE = 32


class UInt16(int):
    type = 5


class UInt32(int):
    type = 6


class UInt64(int):
    type = 9


def _control(type_: int, size: int) -> bytes:
    """The control byte(s): type in the top 3 bits (0 and an extra byte for types above 7),
    then the payload size, in 5 bits or spilling into 1-3 more bytes."""
    if size < 29:
        head, extra = size, b""
    elif size < 29 + 256:
        head, extra = 29, bytes([size - 29])
    elif size < 285 + 65536:
        head, extra = 30, struct.pack(">H", size - 285)
    else:
        head, extra = 31, struct.pack(">I", size - 65821)[1:]
    if type_ <= 7:
        return bytes([type_ << 5 | head]) + extra
    return bytes([head, type_ - 7]) + extra


def encode(value) -> bytes:
    """One value of the data section, in the format's own encoding."""
    if isinstance(value, bool):
        return _control(14, int(value))
    if isinstance(value, int):
        type_ = getattr(value, "type", 6 if 0 <= value < 2**32 else 9)
        payload = int(value).to_bytes((int(value).bit_length() + 7) // 8, "big")
        return _control(type_, len(payload)) + payload
    if isinstance(value, float):
        return _control(3, 8) + struct.pack(">d", value)
    if isinstance(value, str):
        payload = value.encode()
        return _control(2, len(payload)) + payload
    if isinstance(value, bytes):
        return _control(4, len(value)) + value
    if isinstance(value, dict):
        return _control(7, len(value)) + b"".join(encode(str(k)) + encode(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return _control(11, len(value)) + b"".join(encode(v) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__} in a MaxMind DB")


def write_mmdb(
    path, networks: dict[str, dict], *, database_type: str = "GeoLite2-Country", ip_version: int = 6
) -> None:
    """Write a MaxMind DB at `path` mapping each CIDR network to its record. A more specific
    network inside a wider one wins for its addresses."""
    bits = 128 if ip_version == 6 else 32
    parsed = []
    for cidr, record in networks.items():
        net = ipaddress.ip_network(cidr)
        if net.version == 6 and ip_version == 4:
            raise ValueError(f"{cidr}: an IPv6 network in an IPv4 database")
        # an IPv4 network in an IPv6 tree: ::a.b.c.d/(96 + prefix), i.e. the same integer
        parsed.append((net.prefixlen + bits - net.max_prefixlen, int(net.network_address), record))

    data, offsets = bytearray(), {}  # offsets: encoded record -> its offset in the data section
    nodes: list[list] = [[None, None]]  # a record: an int (node), ("data", offset), or None (empty)
    for prefix, address, record in sorted(parsed, key=lambda p: p[0]):  # wider networks first
        blob = encode(record)
        if blob not in offsets:
            offsets[blob] = len(data)
            data += blob
        node = 0
        for depth in range(prefix):
            bit = address >> (bits - 1 - depth) & 1
            if depth == prefix - 1:
                nodes[node][bit] = ("data", offsets[blob])
                break
            child = nodes[node][bit]
            if not isinstance(child, int):  # empty, or a wider network's data: split it
                nodes.append([child, child])
                child = nodes[node][bit] = len(nodes) - 1
            node = child
        else:
            raise ValueError("a network of prefix length 0 (the whole address space) is not supported")

    node_count = len(nodes)

    def record_value(rec) -> int:
        if rec is None:
            return node_count
        if isinstance(rec, int):
            return rec
        return node_count + 16 + rec[1]

    tree = b"".join(struct.pack(">II", record_value(left), record_value(right)) for left, right in nodes)
    metadata = {
        "node_count": UInt32(node_count),
        "record_size": UInt16(RECORD_SIZE),
        "ip_version": UInt16(ip_version),
        "database_type": database_type,
        "languages": ["en"],
        "binary_format_major_version": UInt16(2),
        "binary_format_minor_version": UInt16(0),
        "build_epoch": UInt64(int(time.time())),
        "description": {"en": f"tinytrack test {database_type} database"},
    }
    with open(path, "wb") as f:
        f.write(tree + bytes(16) + bytes(data) + METADATA_MARKER + encode(metadata))
