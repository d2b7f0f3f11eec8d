from .app import maps_main

maps_main()
