"""A shared object is checked before the dynamic loader sees it: a malformed one kills the process there.

The loader maps each segment a program header describes and reads the dynamic section through that mapping:
a segment that reaches past the end of the file (a truncated library, with its hashes fixed) maps pages that
do not exist, and the first read of them is a SIGBUS inside the loader, which no Python code can catch.
``check_shared_object`` reads the ELF header and the program headers and refuses, with an ArchiveError, a file
that is not a shared object for this host (class, byte order, machine) or whose headers or segments do not
lie within the file.

May not: load or run anything: it reads the file's headers through the descriptor it is given.
"""
from __future__ import annotations

import os
import struct

from .errors import ArchiveError

_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # e_ident .. e_shstrndx
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
ET_DYN = 3
PT_LOAD, PT_DYNAMIC = 1, 2
# e_machine of the hosts torch ships CPU wheels for.
MACHINES = {"x86_64": 62, "aarch64": 183}
MAX_PROGRAM_HEADERS = 4096


def check_shared_object(fd: int, size: int, machine: str, where: str) -> None:
    """Refuse (ArchiveError, without a path; ``where`` names the blob) a file open at ``fd`` of ``size`` bytes
    that is not a 64-bit little-endian shared object for ``machine`` whose program headers and segments all
    lie within the file."""
    def bad(reason: str) -> ArchiveError:
        return ArchiveError(f"{where} is not a loadable shared object: {reason}")

    head = os.pread(fd, _ELF64_HEADER.size, 0)
    if len(head) < 4 or head[:4] != b"\x7fELF":
        raise bad("no ELF magic at byte 0")
    if len(head) < _ELF64_HEADER.size:
        raise bad(f"the file is {size} bytes, shorter than an ELF header ({_ELF64_HEADER.size})")
    (ident, e_type, e_machine, e_version, _entry, e_phoff, e_shoff, _flags, e_ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, _shstrndx) = _ELF64_HEADER.unpack(head)
    if ident[4] != 2:
        raise bad(f"ELF class {ident[4]}, expected 2 (64-bit)")
    if ident[5] != 1:
        raise bad(f"ELF data encoding {ident[5]}, expected 1 (little-endian)")
    if ident[6] != 1 or e_version != 1:
        raise bad(f"ELF version {ident[6]}/{e_version}, expected 1")
    if e_type != ET_DYN:
        raise bad(f"ELF type {e_type}, expected {ET_DYN} (a shared object)")
    want = MACHINES.get(machine)
    if want is not None and e_machine != want:
        raise bad(f"ELF machine {e_machine}, expected {want} ({machine})")
    if e_ehsize != _ELF64_HEADER.size or e_phentsize != _ELF64_PHDR.size:
        raise bad(f"header sizes {e_ehsize}/{e_phentsize}, expected {_ELF64_HEADER.size}/{_ELF64_PHDR.size}")
    if not 0 < e_phnum <= MAX_PROGRAM_HEADERS:
        raise bad(f"{e_phnum} program headers (expected 1 to {MAX_PROGRAM_HEADERS})")
    if e_phoff + e_phnum * e_phentsize > size:
        raise bad(f"its program headers end at byte {e_phoff + e_phnum * e_phentsize}, past the end of the file "
                  f"({size} bytes)")
    if e_shoff and e_shoff + e_shnum * e_shentsize > size:
        raise bad(f"its section headers end at byte {e_shoff + e_shnum * e_shentsize}, past the end of the file "
                  f"({size} bytes)")
    table = os.pread(fd, e_phnum * e_phentsize, e_phoff)
    if len(table) != e_phnum * e_phentsize:
        raise bad("its program headers end early (the file changed while it was read?)")
    kinds = set()
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz, p_memsz, _ = _ELF64_PHDR.unpack_from(table, i * e_phentsize)
        kinds.add(p_type)
        if p_filesz and p_offset + p_filesz > size:
            raise bad(f"segment {i} (type {p_type:#x}) covers bytes {p_offset}..{p_offset + p_filesz}, past the end "
                      f"of the file ({size} bytes): a truncated library")
        if p_type == PT_LOAD and p_filesz > p_memsz:
            raise bad(f"loadable segment {i} holds {p_filesz} bytes of file in {p_memsz} bytes of memory")
    if PT_LOAD not in kinds or PT_DYNAMIC not in kinds:
        raise bad("it has no loadable segment or no dynamic section")
