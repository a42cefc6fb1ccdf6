"""evaluation.protocol: the settings a table records, and whether a table was made with others."""

from minilm_jax.evaluation import protocol
from evaluation_helpers import TINY


def test_made_with_reads_the_text_protocol_and_tasks():
  want = protocol.settings_of(TINY, "book.txt", ["nsp"], ())
  assert protocol.made_with(protocol.settings_of(TINY, "book.txt", ["nsp", "package"], ()), want)
  old = {k: v for k, v in protocol.settings_of(TINY, "book.txt", ["nsp"], ()).items() if k != "text_field"}
  assert protocol.made_with(old, want)  # a table from before text_field read "text"
  assert not protocol.made_with(protocol.settings_of(TINY, None, ["nsp"], ()), want)
  assert not protocol.made_with(protocol.settings_of(TINY, "book.txt", ["package"], ()), want)
  assert not protocol.made_with(protocol.settings_of(protocol.Protocol(), "book.txt", ["nsp"], ()), want)
