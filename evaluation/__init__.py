"""Evaluation: scoring generations of registry refs, and inspecting adapters (top floor: may import serve/, trainers/ and storage/)."""
