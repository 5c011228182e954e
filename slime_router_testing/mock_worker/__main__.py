"""``python -m slime_router_testing.mock_worker --port P ...``"""

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
