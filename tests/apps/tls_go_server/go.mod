module waybill/tls_go_server

go 1.19
