"""tokenledger-client: a typed client of the tokenledger API, and a LiteLLM
proxy hook (`tokenledger_client.litellm_hook`, with the `[litellm]` extra).

    from tokenledger_client import AsyncClient
    async with AsyncClient(url, api_key) as ledger:
        rsv = await ledger.reserve_for("gpt-4o-mini", 1200, 800, 100, account="employee:e-1042")
        ...  # call the model with max_tokens=rsv.max_output_tokens_allowed
        await ledger.capture_usage(rsv, response["usage"], model="gpt-4o-mini")
"""

from tokenledger_client import errors
from tokenledger_client.client import AsyncClient, Client, RetryPolicy, Timeouts
from tokenledger_client.errors import LedgerUnreachable, TokenledgerError
from tokenledger_client.flusher import UsageFlusher
from tokenledger_client.models import (
    Account,
    CaptureResult,
    Estimate,
    Reservation,
    Transaction,
    UsageBatchResponse,
    UsageBatchResult,
    UsageCounts,
    UsageEvent,
    UsageRecorded,
)
from tokenledger_client.usage import usage_counts
from tokenledger_client.webhooks import WebhookVerificationError, verify

__version__ = "0.1.0"

__all__ = [
    "Account",
    "AsyncClient",
    "CaptureResult",
    "Client",
    "Estimate",
    "LedgerUnreachable",
    "Reservation",
    "RetryPolicy",
    "Timeouts",
    "TokenledgerError",
    "Transaction",
    "UsageBatchResponse",
    "UsageBatchResult",
    "UsageCounts",
    "UsageEvent",
    "UsageFlusher",
    "UsageRecorded",
    "WebhookVerificationError",
    "errors",
    "usage_counts",
    "verify",
]
