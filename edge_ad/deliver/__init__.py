"""Getting events out without loss: payloads, the outbox, the MQTT link and the sinks."""
