/* pcapng encoding (placeholder until the encoder lands). */
