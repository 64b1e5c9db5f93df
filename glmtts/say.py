"""``glmtts-say TEXT -o out.wav``: synthesise one text through a GLM-TTS endpoint."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from glmtts.client import DEFAULT_URL, GLMTTSClient, TTSResult
from glmtts.errors import APIError, ClientError, GenerationFailed, TransportError

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmtts-say",
        description="Synthesise TEXT with a GLM-TTS server (or the sidecar in front of one) into a WAV file.",
        epilog="Exit status: 0 written, 1 the server refused or failed, 2 bad usage, 3 server unreachable.",
    )
    p.add_argument("text", metavar="TEXT", help="text to speak; '-' reads it from standard input")
    p.add_argument("-o", "--output", required=True, type=Path, help="WAV file to write ('-' for stdout)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument("--index", help="prompt preset on the server (default exampleA unless --prompt-audio)")
    p.add_argument("--prompt-audio", type=Path, help="reference voice to upload (needs --prompt-text)")
    p.add_argument("--prompt-text", help="what is said in --prompt-audio")
    p.add_argument("--sample-rate", type=int, choices=(24000, 32000))
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the answer")
    p.add_argument("-H", "--header", action="append", default=[], metavar="NAME:VALUE",
                   help="extra request header, e.g. 'Authorization: Bearer KEY' (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def _headers(raw: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"--header expects NAME:VALUE, got {item!r}")
        headers[name.strip()] = value.strip()
    return headers


async def _say(args: argparse.Namespace, text: str, headers: dict[str, str]) -> TTSResult:
    index = args.index if args.index or args.prompt_audio else "exampleA"
    async with GLMTTSClient(args.url, timeout=args.timeout, headers=headers) as client:
        return await client.tts(text, index=index, prompt_audio=args.prompt_audio,
                                prompt_text=args.prompt_text, sample_rate=args.sample_rate, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.text == "-" else args.text
    if args.prompt_audio is not None:
        if args.prompt_text is None:
            parser.error("--prompt-audio needs --prompt-text (what is said in it)")
        if not args.prompt_audio.is_file():
            parser.error(f"--prompt-audio: no such file: {args.prompt_audio}")
    headers = _headers(args.header, parser)
    try:
        result = asyncio.run(_say(args, text, headers))
    except TransportError as exc:
        print(f"glmtts-say: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except APIError as exc:
        print(f"glmtts-say: server answered {exc.status}: {exc.detail}", file=sys.stderr)
        return EXIT_SERVER
    except GenerationFailed as exc:
        print(f"glmtts-say: generation failed: {exc.error}", file=sys.stderr)
        return EXIT_SERVER
    except ClientError as exc:
        print(f"glmtts-say: {exc}", file=sys.stderr)
        return EXIT_SERVER
    if str(args.output) == "-":
        sys.stdout.buffer.write(result.wav)
        sys.stdout.buffer.flush()
    else:
        try:
            args.output.write_bytes(result.wav)
        except OSError as exc:
            print(f"glmtts-say: cannot write {args.output}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if not args.quiet:
        where = "stdout" if str(args.output) == "-" else str(args.output)
        took = f", generated in {result.generation_time:.2f} s" if result.generation_time is not None else ""
        print(f"wrote {where}: {result.duration:.2f} s of audio at {result.sample_rate} Hz{took}",
              file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
