"""A real SMTP server for Herald's end-to-end tests: aiosmtpd, with a handler that keeps
every accepted message and answers some recipients with the failures a real server gives.

    python3 tests/smtp/server.py DIR [--down] [--later N] [--password PW] [--cert PEM --key PEM]

Prints the port it listens on (127.0.0.1, chosen by the system) once it accepts connections,
then serves until killed. Each accepted message becomes DIR/<n>.eml (the bytes received) and
DIR/<n>.json: the envelope and the message as Python's email package parses it (headers and
every leaf part), written before the 250 reply so a test that sees the status sees the file.

Answers, by the recipient's local part:
  bounce...  550 5.1.1 mailbox unavailable (at RCPT)
  full...    552 5.2.2 mailbox full (at RCPT)
  later...   451 4.3.0 try again later, for the first N attempts of that address (--later, 1)
  anything   250
--down answers 421 to every MAIL. --password requires AUTH (PLAIN or LOGIN, offered without
TLS) with any user and that password; a wrong one gets 535. --cert/--key offer STARTTLS.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import sys
import warnings

from aiosmtpd.smtp import SMTP, AuthResult


class Handler:
    def __init__(self, directory, down, later):
        self.directory = directory
        self.down = down
        self.later = later
        self.tries = {}
        self.count = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.down:
            return "421 4.3.2 service not available, closing channel"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("bounce"):
            return "550 5.1.1 mailbox unavailable"
        if local.startswith("full"):
            return "552 5.2.2 mailbox full"
        if local.startswith("later"):
            seen = self.tries.get(address, 0) + 1
            self.tries[address] = seen
            if seen <= self.later:
                return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        n = self.count
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        parts = []
        for part in parsed.walk():
            if part.is_multipart():
                continue
            parts.append({"content_type": part.get_content_type(), "content": part.get_content()})
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": session.ssl is not None,
            "authenticated": bool(session.authenticated),
            "content_type": parsed.get_content_type(),
            "headers": [[k, str(v)] for k, v in parsed.items()],
            "parts": parts,
        }
        base = os.path.join(self.directory, str(n))
        with open(base + ".eml", "wb") as f:
            f.write(raw)
        with open(base + ".json.tmp", "w") as f:
            json.dump(record, f)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 Ok: queued as herald-test-%d" % n


async def main():
    # AUTH without TLS is what the secrets test needs; aiosmtpd rightly warns about it.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("--down", action="store_true")
    p.add_argument("--later", type=int, default=1)
    p.add_argument("--password")
    p.add_argument("--cert")
    p.add_argument("--key")
    args = p.parse_args()

    handler = Handler(args.directory, args.down, args.later)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = args.password is not None and auth_data.password.decode("utf-8", "replace") == args.password
        # handled=False: aiosmtpd answers 535 itself (its default assumes we already did).
        return AuthResult(success=ok, handled=False)

    def factory():
        options = dict(enable_SMTPUTF8=True, tls_context=tls, hostname="smtp.test")
        if args.password is not None:
            options.update(auth_required=True, auth_require_tls=False, authenticator=authenticator)
        return SMTP(handler, **options)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
