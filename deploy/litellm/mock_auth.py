"""TESTING ONLY: a LiteLLM `custom_auth` that lets the caller send `mock_response`.

The proxy strips `mock_response` from a request unless the calling key's
metadata has `allow_client_mock_response: true`. With no LiteLLM database the
master key has no metadata, so deploy/litellm/config.yaml names this function
to grant it; the proxy has already checked the key against the master key when
it runs. Remove it from a production config.
"""

from litellm.proxy._types import UserAPIKeyAuth


async def allow_client_mock_response(request, api_key: str) -> UserAPIKeyAuth:  # noqa: ANN001
    return UserAPIKeyAuth(api_key=api_key, metadata={"allow_client_mock_response": True})
