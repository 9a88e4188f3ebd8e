"""The pictures the scripts draw: images side by side under their prompt, each captioned with its score."""
import math
import os

from PIL import Image, ImageDraw, ImageFont, ImageOps

from social_reward.data.cells import image_file
from social_reward.data.images import load_truncated_images


def comparison_picture(picked, path, thumb=192, image_format=None):
    """One row per prompt, one column per name (a scorer, a generator): picked is [(prompt, {name: (image, score)})],
    each image captioned with its name and score."""
    load_truncated_images()  # the images the scoring code read, as it read them (a truncated JPEG too)
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


def contact_sheet(ranking, path, thumb=224, columns=5):
    """Draw the ranked images in a grid, each with its rank and score underneath, and save it to `path`."""
    load_truncated_images()  # the images the scoring code read, as it read them (a truncated JPEG too)
    columns = min(columns, len(ranking))
    rows, label = math.ceil(len(ranking) / columns), 28
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=15)
    for i, (image_path, score) in enumerate(zip(ranking.path, ranking.score)):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label)
        with Image.open(image_path) as image:
            sheet.paste(ImageOps.pad(image.convert("RGB"), (thumb, thumb), color="white"), (x, y))
        draw.text((x + 6, y + thumb + 6), f"#{i + 1}  {score:.4f}  {os.path.basename(image_path)[:24]}", fill="black", font=font)
    sheet.save(path)


def reliability_picture(entries, path, size=300):
    """A reliability diagram per scorer, side by side: the held-out pairs' observed frequency against the predicted
    probability per bin (bins of equal count), the diagonal a calibrated scorer lies on."""
    margin, header = 44, 40
    sheet = Image.new("RGB", (len(entries) * (size + 2 * margin), size + header + 2 * margin), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=13)
    for i, (name, entry) in enumerate(entries.items()):
        x0, y0 = i * (size + 2 * margin) + margin, header + margin
        at = lambda p, f: (x0 + p * size, y0 + (1 - f) * size)
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
        draw.line([at(0, 0), at(1, 1)], fill=(160, 160, 160), width=1)
        for tick in (0, 0.5, 1):
            draw.text((at(tick, 0)[0] - 8, y0 + size + 4), f"{tick:g}", fill="black", font=font)
            draw.text((x0 - 24, at(0, tick)[1] - 7), f"{tick:g}", fill="black", font=font)
        draw.text((x0 + size / 2 - 50, y0 + size + 20), "predicted P(win)", fill="black", font=font)
        points = [at(p, f) for p, f, _ in entry.get("bins", [])]
        if len(points) > 1:
            draw.line(points, fill=(120, 150, 220), width=1)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(40, 90, 200))
        draw.text((x0, 6), f"{name}: t = {entry['temperature']:.4g}", fill="black", font=font)
        draw.text((x0, 22), f"held out {entry['held_out_pairs']} pairs: ECE {entry['ece']:.3f}, nll {entry['nll']:.3f}",
                  fill="black", font=font)
        draw.text((x0 + 4, y0 + 4), "observed frequency", fill="black", font=font)
    sheet.save(path, format="png")
