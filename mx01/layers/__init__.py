"""Building blocks of the MiniMax-Text-01 decoder, one file each."""
