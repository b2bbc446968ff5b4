"""Tests of the momentum machinery: EMA update, momentum encoder, queues, AMF."""
