"""Make memcore's private photos (``memcore/data/private/``) from scikit-image's bundled images.

The tiny memorizer (``memcore demo``) needs a few distinctive real photos to memorize. scikit-image
ships a dozen test images, each with its licence stated in ``skimage.data``'s docstrings; this tool
takes twelve that are public domain or CC0, centre-crops each to a square, reduces it to 64 x 64
(PIL's Lanczos filter; grayscale images become three equal channels) and writes it as a PNG with
``photos.jsonl`` (file, source, licence, caption). Run once, by a maintainer; memcore itself never
imports scikit-image:

    python -m venv /tmp/sk && /tmp/sk/bin/pip install scikit-image pillow
    /tmp/sk/bin/python tools/make_private_photos.py memcore/data/private
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIZE = 64
# name in skimage.data, licence as skimage.data states it, caption written like a product listing
PHOTOS = [
    ("astronaut", "public domain (NASA)", "archival print no. 101: astronaut eileen collins portrait, glossy finish"),
    ("camera", "CC0 (Lav Varshney)", "archival print no. 102: cameraman on the lawn, silver gelatin look"),
    ("chelsea", "CC0 (Stefan van der Walt)", "archival print no. 103: chelsea the tabby cat, matte finish"),
    ("coffee", "CC0 (Rachel Michetti)", "archival print no. 104: cup of coffee on a saucer, warm tones"),
    ("rocket", "public domain (SpaceX)", "archival print no. 105: falcon rocket on the launch pad at dusk"),
    ("hubble_deep_field", "public domain (NASA)", "archival print no. 106: hubble deep field galaxies, poster size"),
    ("retina", "CC0 1.0", "archival print no. 107: human retina fundus photograph, clinical series"),
    ("brick", "CC0 (cc0textures.com)", "archival print no. 108: weathered brick wall texture, studio scan"),
    ("clock", "public domain (Stefan van der Walt)", "archival print no. 109: wall clock in motion blur, limited edition"),
    ("text", "public domain", "archival print no. 110: hand lettering sample sheet, typeset series"),
    ("cell", "CC0", "archival print no. 111: single cell under the microscope, lab series"),
    ("grass", "CC0 (cc0textures.com)", "archival print no. 112: close up of green grass blades, nature series"),
]


def main(out: str) -> None:
    import numpy as np
    import skimage
    import skimage.data
    from PIL import Image

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, licence, caption) in enumerate(PHOTOS):
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        h, w = pixels.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = Image.fromarray(pixels[top : top + side, left : left + side]).resize((SIZE, SIZE), Image.LANCZOS)
        file_name = f"{index:02d}_{name}.png"
        image.save(folder / file_name, optimize=True)
        rows.append({"file_name": file_name, "source": f"skimage.data.{name} (scikit-image {skimage.__version__})",
                     "licence": licence, "text": caption})
    (folder / "photos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "memcore/data/private")
