"""Tests of gradmem_fast.models."""
