"""A /score request's body: read (read_body, on the event loop: it only waits for bytes), then parsed into prompts and
encoded images (parse_in_thread) in a thread, and only as far as the request limits allow, so that no body stalls the
event loop that answers every other connection, /health and disconnects:

- multipart is fed to python-multipart a slice at a time, and a part past the limits (more than --max_images prompts
  or images, a second tensor, an unknown field) ends the parse at once;
- JSON ({"prompts": [...], "images": [base64, ...]} or {"prompts": [...], "tensor": base64}) is walked field by field
  with C-speed searches, never handed to json.loads whole: a list is refused at its first item past --max_images, so
  a body of millions of short prompts costs what --max_images of them cost (json.loads would build every one, holding
  the GIL, and a thread would not help);
- base64 is decoded a slice at a time: each C call is short, so the event loop gets the GIL in between.

The body's memory is counted in --max_queue: a request holds its slot until its parsing thread has let the body go.

    body = await read_body(request, limits, started)
    prompts, images, tensor = await parse_in_thread(content_kind(request), request.headers, body, limits)
"""
import asyncio
import binascii
import codecs
import json
import re
import time

from social_reward.errors import first_line
from social_reward.serving.limits import Refusal

KINDS = ("multipart/form-data", "application/json")
FIELDS = {"prompts": "prompts: must be a list of strings",
          "images": "images: must be a list of base64 strings (PNG or JPEG bytes)",
          "tensor": "tensor: must be a base64 string (.npy bytes)"}
SLICE = 2**20  # bytes a parser or base64 call takes at a time: a few milliseconds of holding the GIL
SPACE = re.compile(rb"[ \t\n\r]*")
STRING_INSIDE = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)  # a JSON string's bytes up to its closing quote


def content_kind(request):
    """multipart/form-data or application/json, from the request's Content-Type; Refusal 415 for any other."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in KINDS:
        raise Refusal(415, f"content-type {kind or 'none'}: send multipart/form-data or application/json")
    return kind


async def read_body(request, limits, started):
    """The request's body, refused (413) past --max_request_bytes, by its Content-Length at once or while it comes in
    (chunked), and (408) when it has not all come by the request's deadline."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_request_bytes:
        raise Refusal(413, f"body: {length} bytes, more than --max_request_bytes {limits.max_request_bytes}")

    async def receive():
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_request_bytes:
                raise Refusal(413, f"body: more than --max_request_bytes {limits.max_request_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)
    try:
        return await asyncio.wait_for(receive(), max(limits.request_timeout - (time.monotonic() - started), 0.001))
    except asyncio.TimeoutError:
        raise Refusal(408, f"body: not received within --request_timeout {limits.request_timeout:g} s") from None


async def parse_in_thread(kind, headers, body, limits):
    """parse_body in a thread. A request cancelled meanwhile (Ray's ingress, a shutdown) waits for the thread, whose
    work the limits bound, before it ends: its --max_queue slot stays taken while the thread holds its body."""
    parsing = asyncio.get_running_loop().run_in_executor(None, parse_body, kind, headers.get("content-type", ""),
                                                         body, limits)
    try:
        return await asyncio.shield(parsing)
    except asyncio.CancelledError:
        await asyncio.wait({parsing})
        raise


def parse_body(kind, content_type, body, limits):
    """(prompts, [encoded images] or None, .npy bytes or None) from a multipart or JSON body; Refusal 4xx naming
    the field at fault."""
    return parse_multipart(content_type, body, limits) if kind == "multipart/form-data" else parse_json(body, limits)


def too_many(field, limits):
    return Refusal(413, f"{field}: more than --max_images {limits.max_images} in one request"
                        f"{' (one prompt an image)' if field == 'prompts' else ''}")


def parse_multipart(content_type, body, limits):
    """parse_body's multipart: repeated prompts fields (text, or file parts read as UTF-8), images file parts, or one
    tensor file part."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Refusal(400, "body: bad multipart (no boundary in its Content-Type)")
    fields, part = {"prompts": [], "images": [], "tensor": []}, {"header": b"", "value": b""}

    def on_header_field(data, start, end):
        part["header"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        if part["header"].strip().lower() == b"content-disposition":
            part["disposition"] = part["value"]
        part["header"], part["value"] = b"", b""

    def on_headers_finished():
        _, options = parse_options_header(part.pop("disposition", None))
        if b"name" not in options:
            raise Refusal(400, "body: a multipart part without a name in its Content-Disposition")
        name = options[b"name"].decode("utf-8", "replace")
        if name not in fields:
            raise Refusal(400, f"{name}: unknown field; send prompts, and images or tensor")
        if name != "prompts" and b"filename" not in options:
            raise Refusal(400, f"{name}: a text field; send it as a file part (with a filename)")
        if name == "tensor" and fields["tensor"]:
            raise Refusal(400, "tensor: given twice; send one .npy batch")
        if len(fields[name]) >= limits.max_images:
            raise too_many(name, limits)
        part.update(name=name, data=[])

    def on_part_data(data, start, end):
        part["data"].append(data[start:end])

    def on_part_end():
        fields[part["name"]].append(b"".join(part.pop("data")))

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        for start in range(0, len(body), SLICE):
            parser.write(body[start:start + SLICE])
        parser.finalize()
    except FormParserError as e:
        raise Refusal(400, f"body: bad multipart ({first_line(e)})") from None
    return ([p.decode("utf-8", "replace") for p in fields["prompts"]], fields["images"] or None,
            fields["tensor"][0] if fields["tensor"] else None)


def parse_json(body, limits):
    """parse_body's JSON: an object of prompts (a list of strings, or one string), and images (a list of base64
    strings) or tensor (a base64 string), in UTF-8 (RFC 8259's JSON between systems); null is an absent field."""
    i = skip(body, 3 if body.startswith(codecs.BOM_UTF8) else 0)
    if body[i:i + 1] != b"{":
        raise Refusal(400, 'body: not JSON of the form {"prompts": [...], "images": [...]} (it does not start '
                           'with "{")')
    fields, i = {}, skip(body, i + 1)
    while body[i:i + 1] != b"}" or fields:  # an object's fields, until no comma follows one
        key, i = json_text(body, i, "a field name in double quotes")
        if key not in FIELDS:
            raise Refusal(400, f"{key}: unknown field; send prompts, and images or tensor")
        fields[key], i = json_field(key, body, skip(body, expect(body, skip(body, i), b":")), limits)
        i = skip(body, i)
        if body[i:i + 1] != b",":
            break
        i = skip(body, i + 1)
    i = expect(body, i, b"}")
    if skip(body, i) != len(body):
        raise not_json("data after the object", skip(body, i))
    prompts, images, tensor = fields.get("prompts", []), fields.get("images"), fields.get("tensor")
    if prompts is None:
        raise Refusal(400, FIELDS["prompts"])
    images = None if images is None else [unbase64(data, f"images[{k}]") for k, data in enumerate(images)]
    return prompts, images, None if tensor is None else unbase64(tensor, "tensor")


def json_field(key, body, i, limits):
    """(the field's value, the index after it) for the JSON value at body[i]: prompts as text, images and tensor as
    their base64 bytes; a list refused at its first item past --max_images."""
    if body.startswith(b"null", i):
        return None, i + 4
    if key == "prompts" and body[i:i + 1] == b'"':
        text, i = json_text(body, i, "a string")
        return [text], i
    if key == "tensor" and body[i:i + 1] == b'"':
        return json_bytes(body, i)
    if key == "tensor" or body[i:i + 1] != b"[":
        raise Refusal(400, FIELDS[key])
    items, i = [], skip(body, i + 1)
    while body[i:i + 1] != b"]" or items:  # the list's items, until no comma follows one
        if body[i:i + 1] != b'"':
            raise not_json("expected a value", i) if body[i:i + 1] in (b"]", b",", b"") else Refusal(400, FIELDS[key])
        if len(items) == limits.max_images:
            raise too_many(key, limits)
        item, i = json_text(body, i, "a string") if key == "prompts" else json_bytes(body, i)
        items.append(item)
        i = skip(body, i)
        if body[i:i + 1] != b",":
            break
        i = skip(body, i + 1)
    return items, expect(body, i, b"]")


def skip(body, i):
    return SPACE.match(body, i).end()


def expect(body, i, char):
    if body[i:i + 1] != char:
        raise not_json(f"expected {char.decode()!r}", i)
    return i + 1


def not_json(what, i):
    return Refusal(400, f"body: not JSON ({what} at byte {i})")


def string_end(body, i):
    """The index of the quote closing the JSON string that opens at body[i]: found with C searches, and where the
    string has escapes, matched a slice at a time."""
    end = body.find(b'"', i + 1)
    if end >= 0 and body.find(b"\\", i + 1, end) < 0:
        return end
    start = i + 1
    while True:
        end = STRING_INSIDE.match(body, start, start + SLICE).end()
        if body[end:end + 1] == b'"':
            return end
        if end == start or end >= len(body):  # a lone backslash at the end, or no closing quote
            raise not_json("a string that does not end", i)
        start = end  # the slice ended inside the string (or cut an escape in two): go on from there


def json_text(body, i, what):
    """(the JSON string at body[i] as text, its escapes read by json.loads; the index after it)."""
    if body[i:i + 1] != b'"':
        raise not_json(f"expected {what}", i)
    end = string_end(body, i) + 1
    try:
        return json.loads(body[i:end]), end
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise not_json(f"a bad string ({first_line(e)})", i) from None


def json_bytes(body, i):
    """(the bytes inside the JSON string at body[i], uncopied; the index after it). Read by json.loads only where it
    has escapes: base64 has none, but an encoder may write "/" as "\\/"."""
    end = string_end(body, i)
    if body.find(b"\\", i + 1, end) < 0:
        return memoryview(body)[i + 1:end], end + 1
    text, end = json_text(body, i, "a string")
    return text.encode("utf-8"), end


def unbase64(data, where):
    """Strict base64 (b64decode(validate=True)'s) decoded a slice at a time; Refusal 400 naming `where`."""
    pieces = []
    for start in range(0, len(data), SLICE):  # SLICE is a multiple of 4: each slice decodes alone
        piece = data[start:start + SLICE]
        try:
            if start + SLICE < len(data) and piece[-1:] == b"=":
                raise binascii.Error("Excess data after padding")
            pieces.append(binascii.a2b_base64(piece, strict_mode=True))
        except binascii.Error as e:
            raise Refusal(400, f"{where}: not base64 ({e})") from None
    return b"".join(pieces)
