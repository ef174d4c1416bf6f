"""Drop reasons: mmpipe's tagged errors and urllib's wording map to stable labels."""

import pytest

from dataprep.crawl_status import reason_for


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            "[too_many_redirects] more than 10 redirects (the last to http://h/x)",
            "too_many_redirects",
        ),
        ("[incomplete_body] connection closed 10 bytes before the end", "incomplete_body"),
        ("IncompleteRead(5 bytes read, 10 more expected)", "incomplete_body"),
        ("[encoding_error] cannot decode the gzip body: invalid block type", "encoding_error"),
        ("[invalid_url] bad port '80x' in 'http://h:80x/'", "invalid_url"),
        ("[too_large] body exceeds 1000 bytes", "too_large"),
        ("HTTP Error 302: The HTTP server returned a redirect error", "http_302"),
        ("Remote end closed connection without response", "connection_error"),
    ],
)
def test_download_errors_get_their_reason(error, reason):
    assert reason_for("failed_to_download", error) == reason
