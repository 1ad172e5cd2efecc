"""Small line charts as PNG with Pillow (no plotting library needed on these machines)."""

from __future__ import annotations

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_chart(path: str, title: str, xlabel: str, ylabel: str, series: dict, size=(640, 420)) -> str:
    """`series`: name -> [(x, y), ...]. Writes a PNG with axes, ticks, a legend."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 150, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for pts in series.values() for p in pts if p[1] is not None]
    if not points:
        draw.text((left, top), f"{title}: no data", fill="black")
        img.save(path)
        return path
    xs = sorted({x for x, _ in points})
    y_max = max(y for _, y in points) * 1.1 or 1.0
    y_min = min(0.0, min(y for _, y in points))

    def to_px(x, y):
        i = xs.index(x)
        px = left + (i / max(1, len(xs) - 1)) * (width - left - right)
        py = top + (1 - (y - y_min) / (y_max - y_min)) * (height - top - bottom)
        return px, py

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for k in range(6):
        y = y_min + (y_max - y_min) * k / 5
        _, py = to_px(xs[0], y)
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((5, py - 6), f"{y:.3g}", fill="black")
    for x in xs:
        px, _ = to_px(x, y_min)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
        draw.text((px - 6, height - bottom + 8), str(x), fill="black")
    draw.text((left, 10), title, fill="black")
    draw.text(((width - right) // 2, height - 20), xlabel, fill="black")
    draw.text((5, top - 25), ylabel, fill="black")
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pix = [to_px(x, y) for x, y in pts if y is not None]
        if len(pix) > 1:
            draw.line(pix, fill=colour, width=2)
        for px, py in pix:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 18 * i
        draw.line([(width - right + 10, ly + 6), (width - right + 30, ly + 6)], fill=colour, width=3)
        draw.text((width - right + 35, ly), name, fill="black")
    img.save(path)
    return path
