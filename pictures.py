"""The pictures the scripts draw: images side by side under their prompt, each captioned with its score."""
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pair_sources import image_file


def comparison_picture(picked, path, thumb=192, image_format=None):
    """One row per prompt, one column per name (a scorer, a generator): picked is [(prompt, {name: (image, score)})],
    each image captioned with its name and score."""
    names = list(picked[0][1])
    header, caption = 34, 24
    sheet = Image.new("RGB", (len(names) * thumb, len(picked) * (header + thumb + caption)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=14)
    for r, (prompt, choice) in enumerate(picked):
        y = r * (header + thumb + caption)
        draw.text((6, y + 10), f"\u201c{prompt[:24 * len(names)]}\u201d", fill="black", font=font)
        for c, name in enumerate(names):
            image_ref, score = choice[name]
            with Image.open(image_file(image_ref)) as image:
                sheet.paste(ImageOps.pad(image.convert("RGB"), (thumb, thumb), color="white"), (c * thumb, y + header))
            draw.text((c * thumb + 6, y + header + thumb + 4), f"{name}: {score:.4f}", fill="black", font=font)
    sheet.save(path, format=image_format)
