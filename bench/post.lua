-- wrk: POST the body in $WRK_BODY (a file), as $WRK_TYPE (default JSON), to the URL given on the command line.
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("WRK_TYPE") or "application/json"
local f = io.open(os.getenv("WRK_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
