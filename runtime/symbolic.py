"""Symbolic sizes and strides: polynomials over an entry's size symbols, with integer coefficients.

A dynamic dimension is a symbol (``batch``); torch.export also accepts *derived* dimensions (``2*d + 1``), and
the strides of a dense tensor are products and sums of sizes (``(d + 1)*w``). Both are :class:`Poly`. In the
manifest a polynomial is a list of monomials, each ``[coefficient, symbol, ...]`` (``[[2, "d"], [1]]`` is
``2*d + 1``); a stride that is a single monomial may also be written flat, ``[3, "w"]`` (format versions 1
and 2). docs/FORMAT.md, "Entries", is the spec.

May not: import torch: it computes with integers.
"""
from __future__ import annotations

from typing import Any

from .errors import ArchiveError

# At most this many monomials in one polynomial, and symbols in one monomial, in a manifest.
MAX_TERMS = 64
MAX_FACTORS = 64


class Poly:
    """A polynomial over symbols: ``terms`` maps a sorted tuple of symbols (a monomial; ``()`` is the
    constant) to its non-zero integer coefficient."""

    __slots__ = ("terms", "symbols")

    def __init__(self, terms: dict[tuple[str, ...], int]):
        self.terms = {k: v for k, v in sorted(terms.items()) if v}
        self.symbols = tuple(sorted({s for k in self.terms for s in k}))

    @classmethod
    def of(cls, x: "int | str | Poly") -> "Poly":
        """A size as a polynomial: an integer, a symbol name, or already a polynomial."""
        if isinstance(x, Poly):
            return x
        if isinstance(x, str):
            return cls({(x,): 1})
        return cls({(): int(x)})

    def __mul__(self, other: "Poly") -> "Poly":
        out: dict[tuple[str, ...], int] = {}
        for ka, va in self.terms.items():
            for kb, vb in other.terms.items():
                k = tuple(sorted(ka + kb))
                out[k] = out.get(k, 0) + va * vb
        return Poly(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Poly) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(tuple(self.terms.items()))

    def __repr__(self) -> str:
        return f"Poly({self.text()})"

    def eval(self, bound: dict[str, int]) -> int:
        """The value with every symbol bound (``bound`` must hold them all)."""
        total = 0
        for syms, coeff in self.terms.items():
            for s in syms:
                coeff *= bound[s]
            total += coeff
        return total

    def linear(self, symbol: str, bound: dict[str, int]) -> tuple[int, int] | None:
        """``(a, b)`` such that this polynomial is ``a*symbol + b`` once the other symbols take their values
        in ``bound``; None when it is not linear in ``symbol`` or another symbol is unbound."""
        a = b = 0
        for syms, coeff in self.terms.items():
            n = syms.count(symbol)
            if n > 1:
                return None
            value = coeff
            for s in syms:
                if s != symbol:
                    if s not in bound:
                        return None
                    value *= bound[s]
            if n:
                a += value
            else:
                b += value
        return (a, b) if a else None

    def single_symbol(self) -> str | None:
        """The symbol's name when the polynomial is exactly one symbol (``d``), else None."""
        if len(self.terms) == 1:
            (syms, coeff), = self.terms.items()
            if coeff == 1 and len(syms) == 1:
                return syms[0]
        return None

    def constant(self) -> int | None:
        """The value when the polynomial has no symbols, else None."""
        if not self.symbols:
            return self.terms.get((), 0)
        return None

    def text(self) -> str:
        """For people: ``2*d + 1``, ``d*w - w``, ``0``."""
        parts: list[str] = []
        for syms, coeff in sorted(self.terms.items(), key=lambda kv: (-len(kv[0]), kv[0])):
            mag = abs(coeff)
            body = "*".join(([str(mag)] if mag != 1 or not syms else []) + list(syms))
            if not parts:
                parts.append(body if coeff > 0 else f"-{body}")
            else:
                parts.append(f"{'+' if coeff > 0 else '-'} {body}")
        return " ".join(parts) or "0"

    def to_json(self) -> list:
        """The manifest's polynomial: a list of monomials ``[coefficient, symbol, ...]``."""
        return [[coeff, *syms] for syms, coeff in self.terms.items()]

    def to_json_stride(self) -> Any:
        """A stride as versions 1 and 2 write it where they can (an integer, or one flat monomial), else as
        a polynomial."""
        constant = self.constant()
        if constant is not None:
            return constant
        if len(self.terms) == 1:
            (syms, coeff), = self.terms.items()
            return [coeff, *syms]
        return self.to_json()


def monomial_from_json(obj: Any, where: str, symbols: dict) -> tuple[tuple[str, ...], int]:
    """One monomial ``[coefficient, symbol, ...]`` over the entry's symbols."""
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int or len(obj) > MAX_FACTORS + 1 or \
            not all(isinstance(x, str) and x in symbols for x in obj[1:]) or abs(obj[0]) >= 2**62:
        raise ArchiveError(f"{where}: a monomial must be [coefficient, symbol, ...] over the entry's symbols")
    return tuple(sorted(obj[1:])), obj[0]


def poly_from_json(obj: Any, where: str, symbols: dict) -> Poly:
    """A polynomial: a non-empty list of monomials over the entry's symbols."""
    if not isinstance(obj, list) or not obj or len(obj) > MAX_TERMS or not all(isinstance(m, list) for m in obj):
        raise ArchiveError(f"{where}: a polynomial must be a list of at most {MAX_TERMS} monomials "
                           "[coefficient, symbol, ...]")
    terms: dict[tuple[str, ...], int] = {}
    for m in obj:
        syms, coeff = monomial_from_json(m, where, symbols)
        if syms in terms:
            raise ArchiveError(f"{where}: a polynomial lists the monomial {'*'.join(syms) or '1'} twice")
        terms[syms] = coeff
    return Poly(terms)
