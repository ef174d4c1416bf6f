"""Reading URL lists in each format."""

import pytest

from dataprep.url_list import UrlListError, check_url_list, read_url_list


def test_txt_list_needs_no_caption_column(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_bytes("http://a/1.jpg\n\n  http://a/图.jpg  \n".encode())
    check_url_list(str(path))  # the default caption_col ("caption") is not required
    table = read_url_list(str(path))
    assert table.to_pydict() == {"url": ["http://a/1.jpg", "http://a/图.jpg"], "caption": ["", ""]}


def test_other_formats_still_require_a_named_caption_column(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("url\nhttp://a/1.jpg\n")
    with pytest.raises(UrlListError, match="no column 'caption'"):
        check_url_list(str(path))
    assert read_url_list(str(path), caption_col=None)["caption"].to_pylist() == [""]
