"""Row bands: which latent rows each rank of a patch group owns.

Band boundaries sit on multiples of the model's total downsampling factor (`align`), so
every band stays integral at every resolution level of the UNet and the band heights
add up to the serial height at each level. Uneven splits give the first bands one more
aligned unit each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from parallel.config import ConfigError


@dataclass(frozen=True)
class BandPlan:
    height: int  # latent rows
    width: int  # latent columns
    align: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @classmethod
    def split(cls, height: int, width: int, members: int, align: int) -> "BandPlan":
        if height % align or width % align:
            raise ConfigError(
                f"latent size {height}x{width} is not a multiple of the model's downsampling factor {align}"
            )
        units = height // align
        if members > units:
            raise ConfigError(
                f"{members} ranks share the latent rows, but a latent of height {height} has only "
                f"{units} bands of {align} rows (the model's downsampling factor); use at most "
                f"{units} ranks per patch group or a larger height"
            )
        base, extra = divmod(units, members)
        sizes = [(base + (1 if i < extra else 0)) * align for i in range(members)]
        starts = tuple(sum(sizes[:i]) for i in range(members))
        ends = tuple(s + n for s, n in zip(starts, sizes))
        return cls(height, width, align, starts, ends)

    @property
    def members(self) -> int:
        return len(self.starts)

    def rows(self, index: int, scale: int = 1) -> int:
        return (self.ends[index] - self.starts[index]) // scale

    def weights(self) -> list[float]:
        """Share of the pixels each band holds (the same at every level)."""
        return [(e - s) / self.height for s, e in zip(self.starts, self.ends)]

    def scale_for_rows(self, index: int, local_rows: int) -> int | Fraction:
        """Latent rows per feature-map row for a map whose local band has `local_rows` rows.

        An int (1, 2, 4 ...) at the latent resolution and downsampled levels; a Fraction
        below one (1/2, 1/4 ...) at upsampled levels (a VAE decoder). Either way
        `height // scale`, `starts[i] // scale` and `rows(i, scale)` are exact row counts
        at that level, so the band heights add up to the serial height there too.
        """
        full = self.rows(index)
        if local_rows > 0 and full % local_rows == 0:
            return full // local_rows
        if local_rows > 0 and local_rows % full == 0:
            return Fraction(1, local_rows // full)
        raise RuntimeError(f"feature map with {local_rows} rows does not match band of {full} rows")

    def scale_for_tokens(self, index: int, local_tokens: int) -> int:
        """The scale of a token sequence (row-major band of a feature map)."""
        scale = math.isqrt(self.rows(index) * self.width // local_tokens)
        if self.rows(index, scale) * (self.width // scale) != local_tokens:
            raise RuntimeError(f"{local_tokens} tokens do not match a band of rank {index}")
        return scale
