"""The demo page: `streamlit run frontend.py` (the page itself is policy_server/demo/page.py)."""

from policy_server.demo.page import main

main()
