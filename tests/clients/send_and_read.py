"""Sends a notification and follows it to `delivered` with the Python client that
openapi-python-client generated from openapi.json, as a user of the client would.

Usage: send_and_read.py <base url> <token> <directory holding herald_client> <webhook url>
Prints the notification's id.
"""

import sys
import time

base_url, token, client_dir, webhook_url = sys.argv[1:5]
sys.path.insert(0, client_dir)

from herald_client import AuthenticatedClient  # noqa: E402
from herald_client.api.notifications import get_notification, send_notification  # noqa: E402
from herald_client.models import Accepted, Notification, NotificationRequest  # noqa: E402

client = AuthenticatedClient(base_url=base_url, token=token)
request = NotificationRequest.from_dict(
    {
        "recipient": {"webhook_url": webhook_url},
        "content": {"title": "From Python", "body": "sent with the generated client"},
    }
)
accepted = send_notification.sync(client=client, body=request, idempotency_key="python-client-1")
assert isinstance(accepted, Accepted), f"send_notification answered {accepted!r}"

deadline = time.monotonic() + 20
while True:
    notification = get_notification.sync(accepted.id, client=client)
    assert isinstance(notification, Notification), f"get_notification answered {notification!r}"
    if notification.status.value == "delivered":
        break
    assert time.monotonic() < deadline, f"still {notification.status.value} after 20 s"
    time.sleep(0.05)
print(accepted.id)
