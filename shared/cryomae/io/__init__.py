"""Micrograph and coordinate file I/O.

Coordinates are particle centres in pixels: x = column, y = row of the 2-D array as read (``data[y, x]``),
0-based, pixel centres at integer positions. Bad input files raise ``cryomae.errors.InputError``.
"""

from cryomae.io.coordinates import COORDINATE_SUFFIXES, Coordinates, check_inside, read_coordinates
from cryomae.io.micrographs import (
    MICROGRAPH_SUFFIXES,
    Micrograph,
    read_ahead,
    read_micrograph,
    validate_mrc_complete,
    write_mrc,
)
from cryomae.io.writers import write_autopick_star, write_coordinate_index, write_coordinates, write_particles_star

__all__ = [
    "COORDINATE_SUFFIXES",
    "MICROGRAPH_SUFFIXES",
    "Coordinates",
    "Micrograph",
    "check_inside",
    "read_ahead",
    "read_coordinates",
    "read_micrograph",
    "validate_mrc_complete",
    "write_autopick_star",
    "write_coordinate_index",
    "write_coordinates",
    "write_mrc",
    "write_particles_star",
]
